using System.CommandLine;
using System.Globalization;
using DslaMesh.Engine.Data;
using DslaMesh.Engine.Models;
using DslaMesh.Engine.Training;

namespace DslaMesh.Cli.Commands;

/// <summary>The Brown corpus encoded with a model's own tokenizer, as the distillation commands use it.</summary>
/// <param name="Train">Training documents, each followed by EOS.</param>
/// <param name="HeldOut">Held-out documents, each followed by EOS (perplexity, sensitivity, held-out losses).</param>
/// <param name="Filler">Held-out text joined by newlines, without EOS (filler of the recall probes).</param>
/// <param name="Source">Where the corpus was read from.</param>
internal sealed record DistillationData(int[] Train, int[] HeldOut, int[] Filler, string Source)
{
    /// <summary>The <c>--data</c> option.</summary>
    public static Option<DirectoryInfo?> CreateOption() => new("--data")
    {
        Description = $"Brown corpus folder (default: ${BrownCorpus.EnvironmentVariable}, else {BrownCorpus.DefaultRelativePath} above the current folder).",
    };

    /// <summary>Reads the corpus and encodes the parts asked for with the model's tokenizer; EOS is the model's first eos_token_id.</summary>
    public static DistillationData Load(string? directory, LoadedModel loaded, bool train, bool filler)
    {
        var corpus = BrownCorpus.Load(directory);
        var tokenizer = loaded.RequireTokenizer();
        var eos = loaded.Model.Config.EosTokenIds.Count > 0
            ? loaded.Model.Config.EosTokenIds[0]
            : throw new ArgumentException($"'{loaded.Directory}/config.json' has no eos_token_id to separate documents with.");
        var heldOutTexts = corpus.HeldOut.Select(d => d.Text).ToArray();
        return new DistillationData(
            train ? TrainingSteps.Encode(tokenizer, corpus.Train.Select(d => d.Text).ToArray(), eos) : [],
            TrainingSteps.Encode(tokenizer, heldOutTexts, eos),
            filler ? tokenizer.Encode(string.Join("\n", heldOutTexts)) : [],
            corpus.Directory);
    }

    /// <summary>Parses "0,0.25,0.5" (invariant culture).</summary>
    public static double[] ParseDoubles(string text, string option) => Split(text, option)
        .Select(p => double.TryParse(p, NumberStyles.Float, CultureInfo.InvariantCulture, out var value) && double.IsFinite(value)
            ? value
            : throw new ArgumentException($"{option}: '{p}' is not a number."))
        .ToArray();

    /// <summary>Parses "512,1024".</summary>
    public static int[] ParseInts(string text, string option) => Split(text, option)
        .Select(p => int.TryParse(p, NumberStyles.Integer, CultureInfo.InvariantCulture, out var value)
            ? value
            : throw new ArgumentException($"{option}: '{p}' is not an integer."))
        .ToArray();

    private static string[] Split(string text, string option)
    {
        var parts = text.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries);
        return parts.Length > 0 ? parts : throw new ArgumentException($"{option}: give at least one value.");
    }
}

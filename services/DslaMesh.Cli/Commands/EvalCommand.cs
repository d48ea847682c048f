using System.CommandLine;
using System.Globalization;
using DslaMesh.Engine.Distillation;

namespace DslaMesh.Cli.Commands;

/// <summary>
/// <c>dslactl eval</c>: held-out perplexity and long-context recall (passkey, key–value) of the teacher and its distilled
/// variants at several fractions of layers converted; prints a table, writes JSON and a PNG plot.
/// </summary>
public static class EvalCommand
{
    /// <summary>Builds the command.</summary>
    public static Command Create()
    {
        var defaults = new EvaluationSettings();
        var engine = new EngineOptions();
        var data = DistillationData.CreateOption();
        var variants = new Option<string?>("--variants") { Description = "Comma-separated variants (default: every variant in dsla/manifest.json)." };
        var fractions = new Option<string>("--fractions") { Description = "Fractions of layers converted, in sensitivity order (0 = the teacher).", DefaultValueFactory = _ => "0,0.25,0.5,0.75,1" };
        var recallFractions = new Option<string?>("--recall-fractions") { Description = "Fractions for the recall probes (default: --fractions)." };
        var lengths = new Option<string>("--lengths") { Description = "Recall sequence lengths in tokens (prompt + generated answer).", DefaultValueFactory = _ => "512,1024,2048" };
        var trials = new Option<int>("--trials") { Description = "Prompts per recall task and length (fixed seeds).", DefaultValueFactory = _ => defaults.Trials };
        var kvPairs = new Option<int>("--kv-pairs") { Description = "key-N: value pairs per key-value prompt.", DefaultValueFactory = _ => defaults.KvPairs };
        var maxNew = new Option<int>("--max-new-tokens") { Description = "Tokens decoded greedily per recall prompt.", DefaultValueFactory = _ => defaults.MaxNewTokens };
        var seqLen = new Option<int>("--seq-len") { Description = "Predictions per perplexity window (clipped to the context).", DefaultValueFactory = _ => defaults.SeqLen };
        var pplTokens = new Option<int>("--ppl-tokens") { Description = "Most held-out tokens predicted for perplexity (0: all).", DefaultValueFactory = _ => defaults.PerplexityTokens };
        var batch = new Option<int>("--batch") { Description = "Sequences per forward pass.", DefaultValueFactory = _ => defaults.Batch };
        var seed = new Option<long>("--seed") { Description = "Seed of the recall prompts.", DefaultValueFactory = _ => defaults.Seed };
        var noRecall = new Option<bool>("--no-recall") { Description = "Perplexity only." };
        var json = new Option<FileInfo?>("--json") { Description = "Write the report as JSON here." };
        var plot = new Option<FileInfo?>("--plot") { Description = "Write a PNG plot here." };
        var command = new Command("eval", "Held-out perplexity and passkey / key-value recall of the teacher and its DSLA variants at several conversion fractions.");
        engine.AddTo(command);
        foreach (var option in new Option[] { data, variants, fractions, recallFractions, lengths, trials, kvPairs, maxNew, seqLen, pplTokens, batch, seed, noRecall, json, plot })
        {
            command.Options.Add(option);
        }
        command.SetAction((result, cancellationToken) => TrainCommand.GuardAsync(() => Task.Run(() =>
        {
            using var loaded = engine.Load(result);
            var names = result.GetValue(variants) is { } list
                ? list.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries)
                : loaded.Manifest?.Variants.Keys.OrderBy(k => DistillCommand.AllVariants.ToList().IndexOf(k)).ToArray() ?? [];
            if (names.Length == 0)
            {
                Console.WriteLine($"'{loaded.Directory}' has no distilled variants; measuring the teacher only.");
            }
            var settings = new EvaluationSettings
            {
                Variants = names,
                Fractions = DistillationData.ParseDoubles(result.GetValue(fractions)!, "--fractions"),
                RecallFractions = result.GetValue(recallFractions) is { } rf ? DistillationData.ParseDoubles(rf, "--recall-fractions") : null,
                Lengths = DistillationData.ParseInts(result.GetValue(lengths)!, "--lengths"),
                Trials = result.GetValue(trials),
                KvPairs = result.GetValue(kvPairs),
                MaxNewTokens = result.GetValue(maxNew),
                SeqLen = result.GetValue(seqLen),
                PerplexityTokens = result.GetValue(pplTokens),
                Batch = result.GetValue(batch),
                Seed = result.GetValue(seed),
                Recall = !result.GetValue(noRecall),
            };
            var streams = DistillationData.Load(result.GetValue(data)?.FullName, loaded, train: false, filler: settings.Recall);
            var report = TrainingDisplay.Run(observer => new DslaEvaluator(loaded, settings, observer).Run(streams.HeldOut, streams.Filler, cancellationToken));
            Console.WriteLine(FormatTable(report));
            if (result.GetValue(json) is { } jsonFile)
            {
                if (jsonFile.Directory is { } folder)
                {
                    folder.Create();
                }
                File.WriteAllText(jsonFile.FullName, DistillationJson.Serialize(report) + "\n");
                Console.WriteLine($"JSON: {jsonFile.FullName}");
            }
            if (result.GetValue(plot) is { } plotFile)
            {
                Console.WriteLine($"Plot: {EvalPlot.Write(report, plotFile.FullName)}");
            }
            return ExitCodes.Ok;
        }, CancellationToken.None)));
        return command;
    }

    /// <summary>One line per (variant, fraction): layers converted, perplexity, recall accuracy per length.</summary>
    internal static string FormatTable(EvaluationReport report)
    {
        var lengths = report.Settings.Recall ? report.Settings.Lengths : [];
        var header = new List<string> { "variant", "fraction", "layers", "perplexity" };
        header.AddRange(lengths.Select(l => string.Create(CultureInfo.InvariantCulture, $"passkey@{l}")));
        header.AddRange(lengths.Select(l => string.Create(CultureInfo.InvariantCulture, $"kv@{l}")));
        var rows = new List<List<string>> { header };
        var notes = new List<string>();
        foreach (var row in new[] { report.Teacher }.OfType<EvaluationRow>().Concat(report.Results))
        {
            var cells = new List<string>
            {
                row.Variant,
                row.Fraction.ToString("0.###", CultureInfo.InvariantCulture),
                row.DslaLayers.Count.ToString(CultureInfo.InvariantCulture),
                row.Perplexity?.ToString("F2", CultureInfo.InvariantCulture) ?? (row.Skipped is null ? "-" : "skipped"),
            };
            foreach (var scores in new[] { row.Passkey, row.KeyValue })
            {
                cells.AddRange(lengths.Select(l => scores?.FirstOrDefault(s => s.Length == l) is { } score
                    ? string.Create(CultureInfo.InvariantCulture, $"{score.Correct}/{score.Trials}")
                    : "-"));
            }
            rows.Add(cells);
            if (row.Skipped is not null)
            {
                notes.Add($"{row.Variant} at {row.Fraction.ToString("0.###", CultureInfo.InvariantCulture)} skipped: {row.Skipped}");
            }
        }
        var widths = Enumerable.Range(0, header.Count).Select(c => rows.Max(r => r[c].Length)).ToArray();
        var lines = rows.Select(r => string.Join("  ", r.Select((cell, c) => c == 0 ? cell.PadRight(widths[c]) : cell.PadLeft(widths[c])))).ToList();
        lines.AddRange(notes);
        lines.Add(string.Create(CultureInfo.InvariantCulture, $"({report.WallSeconds:F1} s on {report.Device}, {report.DType})"));
        return string.Join(Environment.NewLine, lines);
    }
}

using System.Diagnostics;
using System.Globalization;
using System.Text.Json.Serialization;
using DslaMesh.Engine.Dsla;
using DslaMesh.Engine.Models;
using DslaMesh.Engine.Training;

namespace DslaMesh.Engine.Distillation;

/// <summary>What <see cref="DslaEvaluator"/> measures and on how much data.</summary>
public sealed record EvaluationSettings
{
    /// <summary>Variant wire names to evaluate.</summary>
    [JsonPropertyName("variants")] public IReadOnlyList<string> Variants { get; init; } = [];

    /// <summary>Fractions of layers converted (the first floor(f·L) of the order) for perplexity.</summary>
    [JsonPropertyName("fractions")] public IReadOnlyList<double> Fractions { get; init; } = [0, 0.25, 0.5, 0.75, 1];

    /// <summary>Fractions for the recall probes (null: the same as <see cref="Fractions"/>).</summary>
    [JsonPropertyName("recall_fractions")] public IReadOnlyList<double>? RecallFractions { get; init; }

    /// <summary>Predictions per perplexity window (clipped to the model's context).</summary>
    [JsonPropertyName("seq_len")] public int SeqLen { get; init; } = 2048;

    /// <summary>Most held-out tokens predicted for perplexity (0: the whole held-out stream).</summary>
    [JsonPropertyName("ppl_tokens")] public int PerplexityTokens { get; init; }

    /// <summary>
    /// Sequence lengths of the recall probes, in tokens: the prompt plus the <see cref="MaxNewTokens"/> generated ones, so a
    /// probe of length L never reads a position at or beyond L (a 2048 probe fits a 2048-token context).
    /// </summary>
    [JsonPropertyName("lengths")] public IReadOnlyList<int> Lengths { get; init; } = [512, 1024, 2048];

    /// <summary>Prompts per task and length.</summary>
    [JsonPropertyName("trials")] public int Trials { get; init; } = 20;

    /// <summary>Key–value pairs per key–value prompt.</summary>
    [JsonPropertyName("kv_pairs")] public int KvPairs { get; init; } = 6;

    /// <summary>Tokens generated per recall prompt.</summary>
    [JsonPropertyName("max_new_tokens")] public int MaxNewTokens { get; init; } = 8;

    /// <summary>Seeds the recall prompts.</summary>
    [JsonPropertyName("seed")] public long Seed { get; init; } = 1234;

    /// <summary>Sequences per forward pass.</summary>
    [JsonPropertyName("batch")] public int Batch { get; init; } = 8;

    /// <summary>Run the recall probes at all.</summary>
    [JsonPropertyName("recall")] public bool Recall { get; init; } = true;

    /// <summary>The fractions the recall probes run at.</summary>
    [JsonIgnore] public IReadOnlyList<double> EffectiveRecallFractions => Recall ? RecallFractions ?? Fractions : [];

    /// <summary>Checks the values.</summary>
    /// <exception cref="ArgumentException">The first problem found.</exception>
    public void Validate(int contextLength)
    {
        static void Require(bool condition, string message)
        {
            if (!condition)
            {
                throw new ArgumentException(message);
            }
        }
        Require(Fractions.Count > 0 && Fractions.All(f => f is >= 0 and <= 1), "--fractions must list values in [0, 1].");
        Require(RecallFractions is null || RecallFractions.All(f => f is >= 0 and <= 1), "--recall-fractions must list values in [0, 1].");
        Require(SeqLen >= 2, "--seq-len must be at least 2.");
        Require(PerplexityTokens >= 0, "--ppl-tokens must not be negative.");
        Require(Trials >= 1, "--trials must be positive.");
        Require(KvPairs is >= 1 and <= 90, "--kv-pairs must be between 1 and 90.");
        Require(MaxNewTokens >= 1, "--max-new-tokens must be positive.");
        Require(Batch >= 1, "--batch must be positive.");
        if (Recall)
        {
            Require(Lengths.Count > 0, "--lengths must list at least one prompt length.");
            foreach (var length in Lengths)
            {
                Require(length >= MaxNewTokens + 16 && length <= contextLength,
                    $"--lengths: {length} must be at most the model's context ({contextLength}) and leave at least 16 prompt tokens beside the {MaxNewTokens} generated ones.");
            }
        }
    }
}

/// <summary><c>dslactl eval</c>'s JSON: settings and one row per (variant, fraction).</summary>
public sealed class EvaluationReport
{
    [JsonPropertyName("model")] public string Model { get; set; } = "";
    [JsonPropertyName("layers")] public int Layers { get; set; }

    /// <summary>The manifest's conversion order (a variant with a recorded chain order uses that; see each row's layers).</summary>
    [JsonPropertyName("order")] public List<int> Order { get; set; } = [];
    [JsonPropertyName("device")] public string Device { get; set; } = "";
    [JsonPropertyName("dtype")] public string DType { get; set; } = "";
    [JsonPropertyName("settings")] public EvaluationSettings Settings { get; set; } = new();

    /// <summary>Fraction 0: every layer softmax.</summary>
    [JsonPropertyName("teacher")] public EvaluationRow? Teacher { get; set; }
    [JsonPropertyName("results")] public List<EvaluationRow> Results { get; set; } = [];
    [JsonPropertyName("wall_seconds")] public double WallSeconds { get; set; }
}

/// <summary>One (variant, fraction) measurement.</summary>
public sealed class EvaluationRow
{
    /// <summary>Variant wire name, or <c>teacher</c>.</summary>
    [JsonPropertyName("variant")] public string Variant { get; set; } = "";
    [JsonPropertyName("fraction")] public double Fraction { get; set; }

    /// <summary>Layers running as DSLA, in conversion order.</summary>
    [JsonPropertyName("dsla_layers")] public List<int> DslaLayers { get; set; } = [];

    /// <summary>Why the row has no numbers (a layer it needs was not distilled), or null.</summary>
    [JsonPropertyName("skipped")] public string? Skipped { get; set; }
    [JsonPropertyName("heldout_loss")] public double? HeldOutLoss { get; set; }
    [JsonPropertyName("perplexity")] public double? Perplexity { get; set; }
    [JsonPropertyName("ppl_tokens")] public long? PerplexityTokens { get; set; }
    [JsonPropertyName("passkey")] public List<RecallScore>? Passkey { get; set; }
    [JsonPropertyName("kv")] public List<RecallScore>? KeyValue { get; set; }
}

/// <summary>Accuracy of one recall task at one prompt length.</summary>
public sealed class RecallScore
{
    [JsonPropertyName("length")] public int Length { get; set; }
    [JsonPropertyName("correct")] public int Correct { get; set; }
    [JsonPropertyName("trials")] public int Trials { get; set; }
    [JsonPropertyName("accuracy")] public double Accuracy { get; set; }
}

/// <summary>
/// Measures a teacher and its distilled DSLA variants at several conversion depths: held-out perplexity, and passkey and
/// key–value retrieval accuracy by greedy decoding (<see cref="RecallTasks"/>). Fraction f converts the first
/// floor(f·L) layers of the conversion order (the variant's recorded chain order when the manifest has one, else the
/// manifest's order); fraction 0 is the teacher, measured once.
/// </summary>
public sealed class DslaEvaluator
{
    private readonly LoadedModel _loaded;
    private readonly EvaluationSettings _settings;
    private readonly ITrainingObserver _observer;

    public DslaEvaluator(LoadedModel loaded, EvaluationSettings settings, ITrainingObserver? observer = null)
    {
        ArgumentNullException.ThrowIfNull(loaded);
        ArgumentNullException.ThrowIfNull(settings);
        settings.Validate(loaded.Model.ContextLength);
        _loaded = loaded;
        _settings = settings;
        _observer = observer ?? new SilentObserver();
    }

    /// <summary>
    /// Runs every measurement. <paramref name="heldOutStream"/>: held-out token stream (documents separated by EOS) for
    /// perplexity; <paramref name="filler"/>: held-out text tokens for the recall prompts.
    /// </summary>
    /// <exception cref="ArgumentException">A variant is not in the manifest.</exception>
    public EvaluationReport Run(int[] heldOutStream, int[] filler, CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(heldOutStream);
        ArgumentNullException.ThrowIfNull(filler);
        var clock = Stopwatch.StartNew();
        var model = _loaded.Model;
        var layers = model.Layers.Count;
        var manifest = _loaded.Manifest;
        foreach (var variant in _settings.Variants)
        {
            _ = DslaVariants.Parse(variant);
            if (manifest is null || !manifest.Variants.ContainsKey(variant))
            {
                throw new ArgumentException($"'{_loaded.Directory}' has no distilled '{variant}' weights in {DslaManifest.PathFor(_loaded.Directory)}; run dslactl distill --variant {variant} first.");
            }
        }
        var seqLen = Math.Min(_settings.SeqLen, model.ContextLength);
        var report = new EvaluationReport
        {
            Model = _loaded.Directory,
            Layers = layers,
            Order = [.. _loaded.ConversionOrder],
            Device = model.Device.ToString(),
            DType = model.DType.ToString(),
            Settings = _settings with { SeqLen = seqLen },
        };
        var prompts = BuildPrompts(filler);

        report.Teacher = Measure("teacher", 0, [], null, heldOutStream, seqLen, prompts, recall: _settings.EffectiveRecallFractions.Contains(0), cancellationToken);
        foreach (var variant in _settings.Variants)
        {
            cancellationToken.ThrowIfCancellationRequested();
            if (!_loaded.AttachDsla(variant))
            {
                throw new ArgumentException($"The manifest lists '{variant}' but has no weights for it.");
            }
            var set = _loaded.Dsla!;
            var order = manifest!.Variants[variant].Order is { Count: > 0 } chain ? chain : [.. _loaded.ConversionOrder];
            foreach (var fraction in _settings.Fractions.Concat(_settings.EffectiveRecallFractions).Distinct().Order())
            {
                var count = (int)Math.Floor((fraction * layers) + 1e-9);
                var recall = _settings.EffectiveRecallFractions.Contains(fraction);
                var perplexity = _settings.Fractions.Contains(fraction);
                if (count == 0)
                {
                    report.Results.Add(CopyOf(report.Teacher, variant, fraction, perplexity, recall));
                    continue;
                }
                var chosen = order.Take(count).ToList();
                if (chosen.Count < count || chosen.Any(l => !set.Contains(l)))
                {
                    report.Results.Add(new EvaluationRow
                    {
                        Variant = variant,
                        Fraction = fraction,
                        DslaLayers = chosen,
                        Skipped = $"needs {count} converted layers, but {variant} has weights for [{string.Join(", ", set.Layers)}] in order [{string.Join(", ", order)}]",
                    });
                    _observer.OnMessage($"{variant} at {fraction:0.###}: skipped ({report.Results[^1].Skipped}).");
                    continue;
                }
                var row = Measure(variant, fraction, chosen, set.Mix(chosen), heldOutStream, seqLen, prompts, recall, cancellationToken, perplexity);
                report.Results.Add(row);
            }
        }
        report.WallSeconds = clock.Elapsed.TotalSeconds;
        return report;
    }

    private Dictionary<(RecallTask Task, int Length), RecallTrial[]> BuildPrompts(int[] filler)
    {
        var prompts = new Dictionary<(RecallTask, int), RecallTrial[]>();
        if (!_settings.Recall)
        {
            return prompts;
        }
        var tokenizer = _loaded.RequireTokenizer();
        foreach (var task in new[] { RecallTask.Passkey, RecallTask.KeyValue })
        {
            foreach (var length in _settings.Lengths)
            {
                prompts[(task, length)] = Enumerable.Range(0, _settings.Trials)
                    .Select(i => RecallTasks.Build(task, tokenizer, filler, length - _settings.MaxNewTokens, i, _settings.Seed, _settings.KvPairs))
                    .ToArray();
            }
        }
        return prompts;
    }

    private EvaluationRow Measure(string variant, double fraction, List<int> chosen, bool[]? mix, int[] heldOutStream, int seqLen,
        Dictionary<(RecallTask Task, int Length), RecallTrial[]> prompts, bool recall, CancellationToken cancellationToken, bool perplexity = true)
    {
        var watch = Stopwatch.StartNew();
        var row = new EvaluationRow { Variant = variant, Fraction = fraction, DslaLayers = chosen };
        if (perplexity)
        {
            var (loss, tokens) = TrainingSteps.HeldOutLoss(_loaded.Model, heldOutStream, seqLen, _settings.PerplexityTokens, _settings.Batch, mix);
            row.HeldOutLoss = loss;
            row.Perplexity = Math.Exp(loss);
            row.PerplexityTokens = tokens;
        }
        if (recall && _settings.Recall)
        {
            row.Passkey = _settings.Lengths.Select(l => Score(prompts[(RecallTask.Passkey, l)], l, mix, cancellationToken)).ToList();
            row.KeyValue = _settings.Lengths.Select(l => Score(prompts[(RecallTask.KeyValue, l)], l, mix, cancellationToken)).ToList();
        }
        _observer.OnMessage(Describe(row, watch.Elapsed));
        return row;
    }

    private RecallScore Score(RecallTrial[] trials, int length, bool[]? mix, CancellationToken cancellationToken)
    {
        var tokenizer = _loaded.RequireTokenizer();
        var correct = 0;
        foreach (var group in trials.Chunk(_settings.Batch))
        {
            cancellationToken.ThrowIfCancellationRequested();
            var outputs = RecallTasks.GreedyDecode(_loaded.Model, group.Select(t => t.Prompt).ToArray(), mix, _settings.MaxNewTokens);
            for (var i = 0; i < group.Length; i++)
            {
                if (RecallTasks.FirstNumber(tokenizer.Decode(outputs[i])) == group[i].Answer)
                {
                    correct++;
                }
            }
        }
        return new RecallScore { Length = length, Correct = correct, Trials = trials.Length, Accuracy = (double)correct / trials.Length };
    }

    private static EvaluationRow CopyOf(EvaluationRow teacher, string variant, double fraction, bool perplexity, bool recall) => new()
    {
        Variant = variant,
        Fraction = fraction,
        HeldOutLoss = perplexity ? teacher.HeldOutLoss : null,
        Perplexity = perplexity ? teacher.Perplexity : null,
        PerplexityTokens = perplexity ? teacher.PerplexityTokens : null,
        Passkey = recall ? teacher.Passkey : null,
        KeyValue = recall ? teacher.KeyValue : null,
    };

    private static string Describe(EvaluationRow row, TimeSpan elapsed)
    {
        var parts = new List<string>();
        if (row.Perplexity is { } ppl)
        {
            parts.Add(string.Create(CultureInfo.InvariantCulture, $"perplexity {ppl:F2}"));
        }
        if (row.Passkey is { } passkey)
        {
            parts.Add("passkey " + string.Join(", ", passkey.Select(s => string.Create(CultureInfo.InvariantCulture, $"{s.Length}: {s.Correct}/{s.Trials}"))));
        }
        if (row.KeyValue is { } kv)
        {
            parts.Add("kv " + string.Join(", ", kv.Select(s => string.Create(CultureInfo.InvariantCulture, $"{s.Length}: {s.Correct}/{s.Trials}"))));
        }
        return string.Create(CultureInfo.InvariantCulture,
            $"{row.Variant} at {row.Fraction:0.###} ({row.DslaLayers.Count} DSLA layers): {string.Join("; ", parts)} ({elapsed.TotalSeconds:F1} s).");
    }

    private sealed class SilentObserver : ITrainingObserver;
}

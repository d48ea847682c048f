using System.Text.Json;
using DslaMesh.Engine.Backends;
using DslaMesh.Engine.Checkpoints;
using DslaMesh.Engine.Inference;
using DslaMesh.Engine.Models;
using DslaMesh.Engine.Tokenization;
using DslaMesh.Engine.Training;
using static TorchSharp.torch;

namespace DslaMesh.Engine.Tests.Training;

public sealed class LanguageModelTrainerTests : IDisposable
{
    private static readonly string[] Paragraphs =
    [
        "The jury said it did find that many of the registration and election laws are outmoded or inadequate and often ambiguous.",
        "It recommended that the legislators act to have these laws studied and revised to the end of modernizing and improving them.",
        "The grand jury commented on a number of other topics, among them the purchasing departments which it said are well operated.",
        "The city purchasing department, the jury said, is lacking in experienced clerical personnel as a result of city personnel policies.",
        "It urged that the city take steps to remedy this problem, and that the county act to improve the election laws.",
    ];

    private readonly string _root = Directory.CreateTempSubdirectory("dsla-train-").FullName;

    public void Dispose() => Directory.Delete(_root, recursive: true);

    /// <summary>A few KB of repetitive English: 40 training documents, 4 held out.</summary>
    private static TrainingCorpus TinyCorpus()
    {
        var documents = Enumerable.Range(0, 44)
            .Select(i => string.Join("\n", Enumerable.Range(0, 3).Select(j => Paragraphs[((i * 3) + j) % Paragraphs.Length])))
            .ToArray();
        var heldOut = documents.Where((_, i) => i % 11 == 10).ToArray();
        var train = documents.Where((_, i) => i % 11 != 10).ToArray();
        return new TrainingCorpus("tiny", train, heldOut, "every 11th document", ["d10", "d21", "d32", "d43"]);
    }

    private static TrainingRecipe TinyRecipe(int steps = 40) => new()
    {
        VocabSize = 320,
        Layers = 2,
        HiddenSize = 32,
        Heads = 4,
        KvHeads = 2,
        IntermediateSize = 64,
        Context = 64,
        SeqLen = 32,
        Batch = 4,
        Steps = steps,
        PeakLearningRate = 1e-2,
        WarmupSteps = 4,
        CopyFraction = 0,   // 16-token copies would fill half of these 33-token windows; the windows test covers copying
        Seed = 7,
    };

    private sealed class Recorder : ITrainingObserver
    {
        public List<TrainingProgress> Progress { get; } = [];
        public List<EvaluationResult> Evaluations { get; } = [];
        public void OnProgress(TrainingProgress progress) => Progress.Add(progress);
        public void OnEvaluation(EvaluationResult evaluation) => Evaluations.Add(evaluation);
    }

    [Fact]
    public void Tiny_run_lowers_the_loss_and_exports_a_model_that_loads_and_generates()
    {
        var device = TorchRuntime.EnsureCpu();
        var output = Path.Combine(_root, "model");
        var recorder = new Recorder();
        var trainer = new LanguageModelTrainer(TinyRecipe(), new TrainingRunOptions { OutputDirectory = output, LogEvery = 1, EvalEvery = 10 }, device, recorder);

        var result = trainer.Run(TinyCorpus(), TestContext.Current.CancellationToken);

        Assert.True(result.Completed);
        Assert.Equal(40, result.Step);
        Assert.Equal(40, recorder.Progress.Count);
        Assert.True(recorder.Progress[^1].Loss < recorder.Progress[0].Loss - 2.0, $"loss {recorder.Progress[0].Loss:F3} → {recorder.Progress[^1].Loss:F3}");
        Assert.Equal([10, 20, 30, 40], recorder.Evaluations.Select(e => e.Step));
        Assert.True(recorder.Evaluations[^1].Loss < Math.Log(320) - 2.0);

        foreach (var file in new[] { "config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "training_manifest.json", "train_log.jsonl", "README.md" })
        {
            Assert.True(File.Exists(Path.Combine(output, file)), file);
        }
        var config = LlamaConfig.Load(Path.Combine(output, "config.json"));
        Assert.Equal(2, config.NumHiddenLayers);
        Assert.True(config.TieWordEmbeddings);
        Assert.Equal(1, Assert.Single(config.EosTokenIds));
        using (var json = JsonDocument.Parse(File.ReadAllText(Path.Combine(output, "config.json"))))
        {
            Assert.Equal("llama", json.RootElement.GetProperty("model_type").GetString());
            Assert.Equal("default", json.RootElement.GetProperty("rope_parameters").GetProperty("rope_type").GetString());
        }
        using (var weights = SafeTensorsFile.Open(Path.Combine(output, "model.safetensors")))
        {
            Assert.All(weights.Entries.Values, e => Assert.Equal("F16", e.DType));
            Assert.DoesNotContain("lm_head.weight", weights.Entries.Keys);
        }
        var manifest = result.Manifest!;
        Assert.Equal(7, manifest.Seed);
        Assert.Equal(40, manifest.Steps);
        Assert.Equal(40L * 4 * 32, manifest.TokensSeen);
        Assert.Equal(4, manifest.Data.HeldOutDocuments);
        Assert.True(manifest.Final.HeldOutLoss < Math.Log(320) - 2.0);
        Assert.Equal(Math.Exp(manifest.Final.HeldOutLoss), manifest.Final.HeldOutPerplexity, 6);
        Assert.Equal(4, manifest.Evaluations.Count);
        var card = File.ReadAllText(Path.Combine(output, "README.md"));
        Assert.Contains(manifest.WeightsSha256, card, StringComparison.Ordinal);
        Assert.Contains("deploy/data/fetch-brown.sh", card, StringComparison.Ordinal);

        using var model = LlamaForCausalLM.Load(output, ScalarType.Float32, device);
        using var tokenizer = TextTokenizer.Load(output);
        var generator = new TextGenerator(model, tokenizer);
        var tokens = generator.Generate(tokenizer.Encode("The jury said"), new SamplingParameters { Temperature = 0, MaxTokens = 12 }, cancellationToken: TestContext.Current.CancellationToken).ToList();
        Assert.NotEmpty(tokens);
        var text = string.Concat(tokens.Select(t => t.Text));
        Assert.False(string.IsNullOrWhiteSpace(text));
    }

    [Fact]
    public void Resumed_run_continues_at_the_saved_step_and_matches_an_uninterrupted_run()
    {
        var device = TorchRuntime.EnsureCpu();
        var recipe = TinyRecipe(steps: 20);
        var straight = Path.Combine(_root, "straight");
        var interrupted = Path.Combine(_root, "interrupted");
        new LanguageModelTrainer(recipe, new TrainingRunOptions { OutputDirectory = straight, EvalEvery = 5 }, device).Run(TinyCorpus(), TestContext.Current.CancellationToken);

        var first = new LanguageModelTrainer(recipe, new TrainingRunOptions { OutputDirectory = interrupted, EvalEvery = 5, StopAfter = 12 }, device).Run(TinyCorpus(), TestContext.Current.CancellationToken);
        Assert.False(first.Completed);
        Assert.Equal(12, first.Step);
        Assert.Equal(12, LanguageModelTrainer.ReadCheckpointState(interrupted)!.Step);
        Assert.False(File.Exists(Path.Combine(interrupted, "model.safetensors")));

        // Without --resume the trainer refuses to overwrite the checkpoint.
        Assert.Throws<ArgumentException>(() => new LanguageModelTrainer(recipe, new TrainingRunOptions { OutputDirectory = interrupted }, device).Run(TinyCorpus(), TestContext.Current.CancellationToken));
        // With another recipe it refuses to resume.
        Assert.Throws<ArgumentException>(() => new LanguageModelTrainer(recipe with { PeakLearningRate = 1e-3 }, new TrainingRunOptions { OutputDirectory = interrupted, Resume = true }, device).Run(TinyCorpus(), TestContext.Current.CancellationToken));

        var recorder = new Recorder();
        var resumed = new LanguageModelTrainer(recipe, new TrainingRunOptions { OutputDirectory = interrupted, EvalEvery = 5, Resume = true, LogEvery = 1 }, device, recorder).Run(TinyCorpus(), TestContext.Current.CancellationToken);
        Assert.True(resumed.Completed);
        Assert.Equal(13, recorder.Progress[0].Step);
        Assert.Equal(20, resumed.Step);

        // Same batches, same weights, same optimiser moments: bit-identical to the run that was never interrupted.
        AssertSameTensors(Path.Combine(straight, "checkpoint", "model.safetensors"), Path.Combine(interrupted, "checkpoint", "model.safetensors"));
        Assert.Equal(File.ReadAllBytes(Path.Combine(straight, "model.safetensors")), File.ReadAllBytes(Path.Combine(interrupted, "model.safetensors")));
        Assert.Equal(File.ReadAllBytes(Path.Combine(straight, "tokenizer.json")), File.ReadAllBytes(Path.Combine(interrupted, "tokenizer.json")));
        var log = File.ReadAllLines(Path.Combine(interrupted, "train_log.jsonl"));
        Assert.Equal(4, log.Count(l => l.Contains("heldout_loss", StringComparison.Ordinal)));
    }

    [Fact]
    public void Learning_rate_warms_up_then_decays_to_the_floor()
    {
        var trainer = new LanguageModelTrainer(TinyRecipe() with { PeakLearningRate = 1.0, WarmupSteps = 10, MinLearningRateRatio = 0.1 }, new TrainingRunOptions { OutputDirectory = _root }, CPU);
        Assert.Equal(0.1, trainer.LearningRate(0, 110), 9);
        Assert.Equal(1.0, trainer.LearningRate(9, 110), 9);
        Assert.Equal(1.0, trainer.LearningRate(10, 110), 9);
        Assert.Equal(0.55, trainer.LearningRate(10 + 50, 111), 9);
        Assert.Equal(0.1, trainer.LearningRate(109, 110), 9);
    }

    [Fact]
    public void Windows_cover_each_epoch_once_and_depend_only_on_seed_and_step()
    {
        var tokens = Enumerable.Range(0, 1000).ToArray();
        var a = new TokenWindows(tokens, 32, seed: 3);
        var b = new TokenWindows(tokens, 32, seed: 3);
        var starts = Enumerable.Range(0, a.WindowsPerEpoch).Select(i => a.StartOf(i)).ToArray();
        Assert.Equal(starts.Length, starts.Distinct().Count());
        Assert.All(starts, s => Assert.InRange(s, 0, 1000 - 33));
        Assert.Single(starts.Select(s => s % 32).Distinct());   // one offset per epoch
        Assert.Equal(b.Batch(57, 4), a.Batch(57, 4));                    // random access = sequential access
        Assert.NotEqual(new TokenWindows(tokens, 32, seed: 4).Batch(0, 4), a.Batch(0, 4));
        var evaluation = TokenWindows.EvaluationWindows(100, 32);
        Assert.Equal(99, evaluation.Sum(w => w.Length - 1));             // every token but the first predicted once
    }

    [Fact]
    public void Copied_spans_repeat_earlier_text_of_the_window_in_the_requested_share_of_windows()
    {
        // Distinct tokens, so a window is untouched exactly when it counts up by one at every position.
        var tokens = Enumerable.Range(0, 20_000).ToArray();
        const int SeqLen = 255;
        var plain = new TokenWindows(tokens, SeqLen, seed: 7);
        var copied = new TokenWindows(tokens, SeqLen, seed: 7, copyFraction: 0.5);
        Assert.Equal(plain.Batch(3, 8), new TokenWindows(tokens, SeqLen, seed: 7, copyFraction: 0).Batch(3, 8));
        Assert.Equal(copied.Batch(5, 8), new TokenWindows(tokens, SeqLen, seed: 7, copyFraction: 0.5).Batch(5, 8));

        var changed = 0;
        const int Windows = 400;
        for (var sample = 0; sample < Windows; sample++)
        {
            var original = plain.Batch(sample, 1);
            var window = copied.Batch(sample, 1);
            var differs = Enumerable.Range(0, window.Length).Where(i => window[i] != original[i]).ToArray();
            if (differs.Length == 0)
            {
                continue;
            }
            changed++;
            // Every overwritten token repeats one from earlier in the window; a span overwrites at least MinLength
            // tokens and never lands before the MinLength tokens it copied.
            Assert.All(differs, i => Assert.Contains(window[i], original[..i]));
            Assert.InRange(differs.Length, CopySpans.MinLength, CopySpans.MaxSpans * CopySpans.MaxLength);
            Assert.True(differs[0] >= CopySpans.MinLength);
        }
        Assert.InRange(changed, Windows * 35 / 100, Windows * 65 / 100);
    }

    [Fact]
    public void Scrambled_copies_repeat_tokens_that_the_text_cannot_predict()
    {
        var tokens = Enumerable.Range(0, 20_000).ToArray();
        const int SeqLen = 255;
        var plain = new TokenWindows(tokens, SeqLen, seed: 9);
        var scrambled = new TokenWindows(tokens, SeqLen, seed: 9, copyFraction: 1, scrambleCopies: true);
        for (var sample = 0; sample < 50; sample++)
        {
            var original = plain.Batch(sample, 1);
            var window = scrambled.Batch(sample, 1);
            // Some MinLength-token run occurs twice, and it is not the window's own text (which never repeats here).
            var seen = new Dictionary<string, int>();
            var repeated = Enumerable.Range(0, window.Length - CopySpans.MinLength + 1)
                .Select(i => (Start: i, Key: string.Join(',', window.AsSpan(i, CopySpans.MinLength).ToArray())))
                .Where(g => !seen.TryAdd(g.Key, g.Start))
                .ToList();
            Assert.NotEmpty(repeated);
            var (start, key) = repeated[0];
            Assert.NotEqual(original.AsSpan(seen[key], CopySpans.MinLength).ToArray(), window.AsSpan(seen[key], CopySpans.MinLength).ToArray());
            Assert.True(start > seen[key]);
        }
    }

    private static void AssertSameTensors(string expectedPath, string actualPath)
    {
        using var expected = SafeTensorsFile.Open(expectedPath);
        using var actual = SafeTensorsFile.Open(actualPath);
        Assert.Equal(expected.Entries.Keys.Order(), actual.Entries.Keys.Order());
        foreach (var name in expected.Entries.Keys)
        {
            using var x = expected.Read(name);
            using var y = actual.Read(name);
            Assert.True(x.eq(y).all().item<bool>(), $"{name} differs");
        }
    }
}

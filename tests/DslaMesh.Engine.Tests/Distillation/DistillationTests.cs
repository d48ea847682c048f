using DslaMesh.Engine.Backends;
using DslaMesh.Engine.Checkpoints;
using DslaMesh.Engine.Data;
using DslaMesh.Engine.Distillation;
using DslaMesh.Engine.Dsla;
using DslaMesh.Engine.Inference;
using DslaMesh.Engine.Models;
using DslaMesh.Engine.Tests.Dsla;
using DslaMesh.Engine.Tokenization;
using DslaMesh.Engine.Training;
using DslaMesh.Tests.Common;
using static TorchSharp.torch;

namespace DslaMesh.Engine.Tests.Distillation;

public sealed class DistillationTests : IDisposable
{
    private readonly List<string> _folders = [];

    public void Dispose()
    {
        foreach (var folder in _folders)
        {
            Directory.Delete(folder, recursive: true);
        }
    }

    private string TempFolder()
    {
        var folder = Directory.CreateTempSubdirectory("dsla-distill-").FullName;
        _folders.Add(folder);
        return folder;
    }

    /// <summary>A seeded token stream over the tiny vocabulary with some repetition (so windows differ but are not noise).</summary>
    private static int[] Stream(int length, long seed)
    {
        var random = new SplitMix64((ulong)seed);
        var phrase = Enumerable.Range(0, 12).Select(_ => (int)random.NextBelow(TinyModels.Vocab)).ToArray();
        return Enumerable.Range(0, length).Select(i => i % 5 == 4 ? (int)random.NextBelow(TinyModels.Vocab) : phrase[i % phrase.Length]).ToArray();
    }

    private static DistillationRecipe Recipe(string variant, int steps = 6, int klSteps = 3) => new()
    {
        Variant = variant,
        StepsPerLayer = steps,
        SeqLen = 32,
        Batch = 4,
        LearningRate = 3e-3,
        KlLearningRate = 1e-3,
        WarmupSteps = 2,
        KlSteps = klSteps,
        EvalWindows = 4,
        Seed = 11,
    };

    [Fact]
    public void Sensitivity_order_is_ascending_entropy_and_layer_zero_matches_the_attention_entropy()
    {
        using var model = TinyModels.Model(TinyModels.Config(heads: 2, kvHeads: 1, layers: 4), seed: 5);
        var windows = LayerSensitivity.EvenlySpacedWindows(Stream(400, 3), count: 5, length: 48);
        Assert.Equal(5, windows.Count);

        var result = LayerSensitivity.Measure(model, windows, batch: 2);

        Assert.Equal([0, 1, 2, 3], result.Order.Order());
        for (var i = 0; i + 1 < result.Order.Count; i++)
        {
            Assert.True(result.Entropy[result.Order[i]] <= result.Entropy[result.Order[i + 1]], $"order {string.Join(",", result.Order)} is not ascending in entropy");
        }
        Assert.Equal(5, result.Samples);
        Assert.Equal(48, result.SeqLen);
        // Layer 0 sees the embeddings: its entropy is the attention's own last-token entropy on the normed embeddings.
        using (var scope = NewDisposeScope())
        {
            using var ids = LayerSensitivity.Batch(windows, model.Device);
            using var context = model.CreateContext(ids, null, null);
            var direct = model.Layers[0].Attention.LastTokenEntropy(model.Layers[0].InputNorm.forward(model.Embed(ids)), context);
            Assert.Equal(direct, result.Entropy[0], 5);
        }
        Assert.Equal([2, 0, 1], LayerSensitivity.OrderOf([0.5, 0.7, 0.5 - 1e-9]));
        Assert.Equal([0, 1], LayerSensitivity.OrderOf([1.0, 1.0]));
    }

    [Fact]
    public void Captured_input_of_the_next_layer_comes_from_the_hybrid_and_not_from_the_layer_itself()
    {
        using var model = TinyModels.Model(TinyModels.Config(heads: 2, kvHeads: 1, layers: 3), seed: 7);
        using var set = DslaLayerSet.Create(model, DslaVariant.Dsla, [0], seed: 3);
        using var ids = TinyModels.Ids(2, 24, seed: 9);
        var converted = set.Mix([0]);

        using var teacherInput1 = HybridForward.CaptureLayer(model, ids, 1, null);
        using var hybridInput1 = HybridForward.CaptureLayer(model, ids, 1, converted);
        using var teacherInput0 = HybridForward.CaptureLayer(model, ids, 0, null);
        using var hybridInput0 = HybridForward.CaptureLayer(model, ids, 0, converted);

        // Converting layer 0 changes what layer 1 sees ...
        Assert.True(TinyModels.MaxDiff(teacherInput1.Input, hybridInput1.Input) > 1e-3, "layer 1's input ignores that layer 0 runs as DSLA");
        Assert.True(TinyModels.MaxDiff(teacherInput1.Target!, hybridInput1.Target!) > 1e-3);
        // ... but not what layer 0 itself sees (the capture stops before the layer it is for).
        Assert.True(TinyModels.BitwiseEqual(teacherInput0.Input, hybridInput0.Input));
        Assert.True(TinyModels.BitwiseEqual(teacherInput0.Target!, hybridInput0.Target!));
        Assert.Null(HybridForward.CaptureLayer(model, ids, 2, converted, withTarget: false).Target);

        // The residual entering layer L is the model's final hidden state: no layer is skipped or run twice.
        using (var scope = NewDisposeScope())
        using (no_grad())
        {
            using var context = model.CreateContext(ids, null, converted);
            var manual = HybridForward.ResidualBefore(model, ids, model.Layers.Count, context);
            Assert.True(TinyModels.BitwiseEqual(model.Hidden(ids, null, converted), manual));
        }
    }

    [Theory]
    [InlineData("dsla")]
    [InlineData("dsla-foldable")]
    [InlineData("gla")]
    public void A_few_steps_lower_each_layer_loss_and_the_kl_stage_lowers_the_kl(string variant)
    {
        using var model = TinyModels.Model(TinyModels.Config(heads: 2, kvHeads: 1, layers: 2), seed: 5);
        var distiller = new LayerDistiller(model, Recipe(variant, steps: 15, klSteps: 8), new DistillationRunOptions { ModelDirectory = TempFolder(), LogEvery = 5 });

        var result = distiller.Run(Stream(3000, 1), Stream(600, 2), [1, 0], TestContext.Current.CancellationToken);

        Assert.True(result.Completed);
        Assert.Equal((2 * 15) + 8, result.Step);
        Assert.Equal([1, 0], result.State.Layers.Select(l => l.Layer));
        foreach (var layer in result.State.Layers)
        {
            TestContext.Current.TestOutputHelper?.WriteLine($"{variant} layer {layer.Layer}: {layer.InitialLoss:F4} -> {layer.FinalLoss:F4} (after KL {layer.AfterKlLoss:F4}), train {layer.TrainLoss:F4}, cos {layer.GateCosine:F3}, gamma {layer.Gamma:F3}");
            Assert.True(layer.FinalLoss < layer.InitialLoss * 0.9, $"{variant} layer {layer.Layer}: held-out loss {layer.InitialLoss:F4} → {layer.FinalLoss:F4}");
            Assert.True(double.IsFinite(layer.TrainLoss));
            Assert.Equal(variant == "gla", layer.Gamma is null);
        }
        var kl = result.State.Kl!;
        TestContext.Current.TestOutputHelper?.WriteLine($"{variant} KL {kl.InitialKl:F5} -> {kl.FinalKl:F5}");
        Assert.True(kl.FinalKl < kl.InitialKl, $"KL {kl.InitialKl:F5} → {kl.FinalKl:F5}");
        Assert.All(result.State.Layers, l => Assert.NotNull(l.AfterKlLoss));
        // The model is left as it was: no replacement attached, every weight frozen.
        Assert.All(model.Layers, l => Assert.Null(l.Replacement));
        Assert.All(model.parameters(), p => Assert.False(p.requires_grad));
    }

    [Fact]
    public void Micro_batches_add_up_to_the_same_update_as_the_whole_batch()
    {
        var weights = new List<Dictionary<string, float[]>>();
        foreach (var micro in new[] { 0, 1, 3 })
        {
            using var model = TinyModels.Model(TinyModels.Config(heads: 2, kvHeads: 1, layers: 2), seed: 5);
            var folder = TempFolder();
            var result = new LayerDistiller(model, Recipe("dsla", steps: 4, klSteps: 3), new DistillationRunOptions { ModelDirectory = folder, MicroBatch = micro })
                .Run(Stream(2000, 1), Stream(600, 2), [1, 0], TestContext.Current.CancellationToken);
            Assert.True(result.Completed);
            using var file = SafeTensorsFile.Open(result.WeightsPath);
            weights.Add(file.Entries.Keys.ToDictionary(n => n, n =>
            {
                using var t = file.Read(n);
                return t.to(ScalarType.Float32).data<float>().ToArray();
            }));
        }
        foreach (var (name, whole) in weights[0])
        {
            foreach (var other in weights.Skip(1))
            {
                var diff = whole.Zip(other[name], (a, b) => Math.Abs(a - b)).Max();
                Assert.True(diff < 1e-4, $"{name}: micro-batched weights differ by {diff:E2}");
            }
        }
    }

    [Fact]
    public void The_second_layer_is_trained_and_measured_in_the_hybrid_with_the_first_converted()
    {
        using var model = TinyModels.Model(TinyModels.Config(heads: 2, kvHeads: 1, layers: 2), seed: 5);
        var folder = TempFolder();
        var result = new LayerDistiller(model, Recipe("dsla", steps: 8, klSteps: 0), new DistillationRunOptions { ModelDirectory = folder })
            .Run(Stream(2000, 1), Stream(600, 2), [0, 1], TestContext.Current.CancellationToken);

        using var set = DslaLayerSet.Load(model, Path.Combine(folder, "dsla", "dsla.safetensors"));
        using var evalIds = LayerSensitivity.Batch(LayerSensitivity.EvenlySpacedWindows(Stream(600, 2), 4, 32), model.Device);
        var inHybrid = LayerDistiller.EvaluateLayer(model, set[1], 1, set.Mix([0]), evalIds, 4).Loss;
        var onTeacherInputs = LayerDistiller.EvaluateLayer(model, set[1], 1, null, evalIds, 4).Loss;

        Assert.Equal(result.State.Layers[1].FinalLoss, inHybrid, 9);
        Assert.NotEqual(result.State.Layers[1].FinalLoss, onTeacherInputs, 6);
    }

    [Fact]
    public void Output_folder_loads_through_AttachDsla_and_generates()
    {
        var brown = TinyTeachers.SyntheticBrown();
        _folders.Add(brown);
        var folder = TinyTeachers.Create(brown, layers: 3);
        _folders.Add(folder);
        var corpus = BrownCorpus.Load(brown);
        int[] train, heldOut;
        IReadOnlyList<int> order;
        using (var loaded = LoadedModel.Load(folder, new TorchBackendOptions()))
        {
            var tokenizer = loaded.RequireTokenizer();
            train = TrainingSteps.Encode(tokenizer, corpus.Train.Select(d => d.Text).ToArray(), 1);
            heldOut = TrainingSteps.Encode(tokenizer, corpus.HeldOut.Select(d => d.Text).ToArray(), 1);
            var sensitivity = LayerSensitivity.Measure(loaded.Model, LayerSensitivity.EvenlySpacedWindows(heldOut, 4, 64));
            order = sensitivity.Order;
            new DslaManifest { Order = [.. order], Entropy = [.. sensitivity.Entropy] }.Save(folder);
            var result = new LayerDistiller(loaded.Model, Recipe("dsla", steps: 4, klSteps: 2), new DistillationRunOptions { ModelDirectory = folder, CommandLine = "test" })
                .Run(train, heldOut, order, TestContext.Current.CancellationToken);
            Assert.True(result.Completed);
            Assert.Equal(Path.Combine(folder, "dsla", "dsla.safetensors"), result.WeightsPath);
        }
        Assert.False(Directory.Exists(LayerDistiller.CheckpointFolder(folder, "dsla")));

        using var reloaded = LoadedModel.Load(folder, new TorchBackendOptions());
        var manifest = reloaded.Manifest!;
        Assert.Equal(order, manifest.Order);
        Assert.Equal(3, manifest.Entropy.Count);
        var entry = manifest.Variants["dsla"];
        Assert.Equal("dsla.safetensors", entry.File);
        Assert.Equal([0, 1, 2], entry.Layers);
        Assert.Equal(order, entry.Order);
        Assert.Equal(["0", "1", "2"], entry.Losses.Keys.Order());
        Assert.Equal((3 * 4) + 2, entry.Steps);
        Assert.Equal(entry.Steps * 4L * 32, entry.TokensSeen);
        Assert.Equal("cpu", entry.Device);
        Assert.True(entry.WallSeconds > 0);
        Assert.Equal(3, entry.Distillation!.LayerRecords.Count);
        Assert.Equal(ModelExport.Sha256(Path.Combine(folder, "model.safetensors")), entry.Distillation.TeacherSha256);
        Assert.Equal(ModelExport.Sha256(Path.Combine(folder, "dsla", "dsla.safetensors")), entry.Distillation.WeightsSha256);

        Assert.True(reloaded.AttachDsla("dsla"));
        Assert.Equal([0, 1, 2], reloaded.Dsla!.Layers);
        var generator = new TextGenerator(reloaded.Model, reloaded.Tokenizer);
        var prompt = reloaded.Tokenizer!.Encode("The jury said");
        var tokens = generator.Generate(prompt, SamplingParameters.Greedy(8) with { IgnoreEos = true }, reloaded.Dsla.Mix(order.Take(2)), TestContext.Current.CancellationToken).ToList();
        Assert.Equal(8, tokens.Count);
        var allDsla = generator.Generate(prompt, SamplingParameters.Greedy(8) with { IgnoreEos = true }, reloaded.Dsla.MixAll(), TestContext.Current.CancellationToken).ToList();
        Assert.Equal(8, allDsla.Count);
    }

    [Fact]
    public void Resume_continues_from_the_checkpoint_and_matches_an_uninterrupted_run()
    {
        var recipe = Recipe("dsla-foldable", steps: 5, klSteps: 4);
        var train = Stream(2000, 1);
        var heldOut = Stream(600, 2);
        int[] order = [1, 0];

        var straight = TempFolder();
        using (var model = TinyModels.Model(TinyModels.Config(heads: 2, kvHeads: 1, layers: 2), seed: 5))
        {
            Assert.True(new LayerDistiller(model, recipe, new DistillationRunOptions { ModelDirectory = straight }).Run(train, heldOut, order, TestContext.Current.CancellationToken).Completed);
        }

        var interrupted = TempFolder();
        using (var model = TinyModels.Model(TinyModels.Config(heads: 2, kvHeads: 1, layers: 2), seed: 5))
        {
            // Stop in the middle of the second layer, then in the middle of the KL stage, then finish.
            var first = new LayerDistiller(model, recipe, new DistillationRunOptions { ModelDirectory = interrupted, StopAfter = 7 }).Run(train, heldOut, order, TestContext.Current.CancellationToken);
            Assert.False(first.Completed);
            Assert.Equal(7, first.Step);
            var saved = LayerDistiller.ReadCheckpointState(interrupted, "dsla-foldable")!;
            Assert.Equal((DistillationStage.Layers, 1, 2, 7), (saved.Stage, saved.Position, saved.StageStep, saved.Step));
            Assert.Single(saved.Layers);
            Assert.All(model.Layers, l => Assert.Null(l.Replacement));

            var fresh = Assert.Throws<ArgumentException>(() => new LayerDistiller(model, recipe, new DistillationRunOptions { ModelDirectory = interrupted }).Run(train, heldOut, order, TestContext.Current.CancellationToken));
            Assert.Contains("--resume", fresh.Message, StringComparison.Ordinal);
            var other = Assert.Throws<ArgumentException>(() => new LayerDistiller(model, recipe with { LearningRate = 1e-2 }, new DistillationRunOptions { ModelDirectory = interrupted, Resume = true }).Run(train, heldOut, order, TestContext.Current.CancellationToken));
            Assert.Contains("recipe", other.Message, StringComparison.Ordinal);

            var second = new LayerDistiller(model, recipe, new DistillationRunOptions { ModelDirectory = interrupted, Resume = true, StopAfter = 12 }).Run(train, heldOut, order, TestContext.Current.CancellationToken);
            Assert.False(second.Completed);
            Assert.Equal(DistillationStage.Kl, LayerDistiller.ReadCheckpointState(interrupted, "dsla-foldable")!.Stage);

            var third = new LayerDistiller(model, recipe, new DistillationRunOptions { ModelDirectory = interrupted, Resume = true }).Run(train, heldOut, order, TestContext.Current.CancellationToken);
            Assert.True(third.Completed);
            Assert.Equal(14, third.Step);
        }

        using var expected = SafeTensorsFile.Open(Path.Combine(straight, "dsla", "dsla-foldable.safetensors"));
        using var actual = SafeTensorsFile.Open(Path.Combine(interrupted, "dsla", "dsla-foldable.safetensors"));
        Assert.Equal(expected.Entries.Keys.Order(), actual.Entries.Keys.Order());
        foreach (var name in expected.Entries.Keys)
        {
            using var a = expected.Read(name);
            using var b = actual.Read(name);
            Assert.True(TinyModels.BitwiseEqual(a, b), $"{name} differs after resuming");
        }
        var straightEntry = DslaManifest.TryLoad(straight)!.Variants["dsla-foldable"];
        var resumedEntry = DslaManifest.TryLoad(interrupted)!.Variants["dsla-foldable"];
        Assert.Equal(straightEntry.Losses, resumedEntry.Losses);
        Assert.Equal(straightEntry.TokensSeen, resumedEntry.TokensSeen);
        Assert.Equal(straightEntry.Distillation!.Kl!.FinalKl, resumedEntry.Distillation!.Kl!.FinalKl);
    }

    [Fact]
    public void Recall_prompts_have_the_exact_length_and_hold_the_answer()
    {
        var brown = TinyTeachers.SyntheticBrown();
        _folders.Add(brown);
        var folder = TinyTeachers.Create(brown, layers: 2);
        _folders.Add(folder);
        using var tokenizer = TextTokenizer.Load(folder);
        var filler = tokenizer.Encode(string.Join("\n", BrownCorpus.Load(brown).HeldOut.Select(d => d.Text)));
        foreach (var task in new[] { RecallTask.Passkey, RecallTask.KeyValue })
        {
            var trials = Enumerable.Range(0, 6).Select(i => RecallTasks.Build(task, tokenizer, filler, 160, i, seed: 3, pairs: 4)).ToArray();
            Assert.All(trials, t => Assert.Equal(160, t.Prompt.Length));
            Assert.All(trials, t => Assert.Matches("^[1-9][0-9]{4}$", t.Answer));
            Assert.All(trials, t => Assert.Contains(t.Answer, tokenizer.Decode(t.Prompt), StringComparison.Ordinal));
            Assert.True(trials.Select(t => t.Answer).Distinct().Count() > 1);
            var again = RecallTasks.Build(task, tokenizer, filler, 160, 2, seed: 3, pairs: 4);
            Assert.Equal(trials[2].Prompt, again.Prompt);
        }
        var passkey = tokenizer.Decode(RecallTasks.Build(RecallTask.Passkey, tokenizer, filler, 160, 0, seed: 3).Prompt);
        Assert.EndsWith("What is the pass key? The pass key is", passkey, StringComparison.Ordinal);
        Assert.Equal("48213", RecallTasks.FirstNumber(" 48213. Remember"));
        Assert.Null(RecallTasks.FirstNumber(" the key"));
        Assert.Throws<ArgumentException>(() => RecallTasks.Build(RecallTask.KeyValue, tokenizer, filler, 20, 0, seed: 3));
    }
}

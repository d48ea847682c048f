using System.CommandLine;
using System.Globalization;
using DslaMesh.Engine.Backends;
using DslaMesh.Engine.Distillation;
using DslaMesh.Engine.Dsla;
using DslaMesh.Engine.Models;

namespace DslaMesh.Cli.Commands;

/// <summary>
/// <c>dslactl distill</c>: chained layer-wise distillation of DSLA variants from a teacher, written beside it as
/// <c>dsla/&lt;variant&gt;.safetensors</c> and <c>dsla/manifest.json</c> (docs/distillation.md).
/// </summary>
public static class DistillCommand
{
    /// <summary>The variants <c>--variant all</c> distils, in this order.</summary>
    public static readonly IReadOnlyList<string> AllVariants = ["dsla", "dsla-foldable", "gla"];

    /// <summary>Builds the command.</summary>
    public static Command Create()
    {
        var defaults = new DistillationRecipe();
        var model = new Option<DirectoryInfo>("--model", "-m") { Description = "Teacher model folder (config.json, safetensors, tokenizer.json); dsla/ inside it receives the output.", Required = true };
        var variant = new Option<string>("--variant") { Description = "dsla, dsla-foldable, gla or all.", Required = true };
        variant.AcceptOnlyFromAmong([.. AllVariants, "all"]);
        var data = DistillationData.CreateOption();
        var device = new Option<string>("--device") { Description = "cpu, cuda or cuda:N.", DefaultValueFactory = _ => "cpu" };
        var libTorch = new Option<DirectoryInfo?>("--libtorch") { Description = "CUDA LibTorch folder (default: ask python3 where torch lives)." };
        var threads = new Option<int>("--threads") { Description = "CPU threads for LibTorch (0: LibTorch's default)." };
        var steps = new Option<int>("--steps-per-layer") { Description = "Optimiser steps per converted layer.", DefaultValueFactory = _ => defaults.StepsPerLayer };
        var layers = new Option<int>("--layers") { Description = "Convert only the first N layers of the order (0: all).", DefaultValueFactory = _ => defaults.Layers };
        var seqLen = new Option<int>("--seq-len") { Description = "Tokens per training window.", DefaultValueFactory = _ => defaults.SeqLen };
        var batch = new Option<int>("--batch") { Description = "Windows per step.", DefaultValueFactory = _ => defaults.Batch };
        var lr = new Option<double>("--lr") { Description = "Peak learning rate of each layer (warmup, then cosine).", DefaultValueFactory = _ => defaults.LearningRate };
        var minLr = new Option<double>("--min-lr-ratio") { Description = "Each cosine ends at this fraction of its peak.", DefaultValueFactory = _ => defaults.MinLearningRateRatio };
        var warmup = new Option<int>("--warmup") { Description = "Warmup steps of each layer and of the KL stage.", DefaultValueFactory = _ => defaults.WarmupSteps };
        var gateWeight = new Option<double>("--gate-loss-weight") { Description = "λ: weight of the cosine similarity between the two gate sets (dual-state variants).", DefaultValueFactory = _ => defaults.GateLossWeight };
        var klSteps = new Option<int>("--kl-steps") { Description = "Steps of the end-to-end logit-KL stage over every converted layer (0: skip it).", DefaultValueFactory = _ => defaults.KlSteps };
        var klLr = new Option<double>("--kl-lr") { Description = "Peak learning rate of the KL stage.", DefaultValueFactory = _ => defaults.KlLearningRate };
        var weightDecay = new Option<double>("--weight-decay") { Description = "AdamW weight decay.", DefaultValueFactory = _ => defaults.WeightDecay };
        var gradClip = new Option<double>("--grad-clip") { Description = "Global gradient-norm clip.", DefaultValueFactory = _ => defaults.GradClip };
        var evalWindows = new Option<int>("--eval-windows") { Description = "Held-out windows each layer's loss and the KL are measured on.", DefaultValueFactory = _ => defaults.EvalWindows };
        var copyFraction = new Option<double>("--copy-fraction") { Description = "Share of training windows that get spans of their own text copied further on (teaches retrieval from the context).", DefaultValueFactory = _ => defaults.CopyFraction };
        var copyScrambled = new Option<bool>("--copy-scrambled") { Description = "Copied spans repeat tokens drawn at random from the corpus, so only looking them up predicts them.", DefaultValueFactory = _ => defaults.CopyScrambled };
        var seed = new Option<long>("--seed") { Description = "Seed for the DSLA initialisation (layer i: seed + i) and the training windows.", DefaultValueFactory = _ => defaults.Seed };
        var saveDType = new Option<string>("--save-dtype") { Description = "Storage type of the weights written at the end: float32, float16 or bfloat16 (γ stays fp32).", DefaultValueFactory = _ => defaults.SaveDType };
        saveDType.AcceptOnlyFromAmong("float32", "float16", "bfloat16");
        var samples = new Option<int>("--samples") { Description = "When the manifest has no order: held-out windows for the sensitivity measurement.", DefaultValueFactory = _ => SensitivityCommand.DefaultSamples };
        var sensitivityLen = new Option<int>("--sensitivity-seq-len") { Description = "When the manifest has no order: tokens per sensitivity window.", DefaultValueFactory = _ => SensitivityCommand.DefaultSeqLen };
        var resume = new Option<bool>("--resume") { Description = "Continue each variant's checkpoint (its recipe is used; explicit options must agree); variants already distilled with this recipe are skipped." };
        var stopAfter = new Option<int>("--stop-after") { Description = "Write a checkpoint and stop after step N of a variant (continue later with --resume)." };
        var logEvery = new Option<int?>("--log-every") { Description = "Progress report every N steps (default: 1 on CPU, 10 on CUDA)." };
        var microBatch = new Option<int?>("--micro-batch") { Description = "Rows per forward/backward pass within a step; the update is the same, memory smaller (default: the whole batch on CUDA, 2 on CPU)." };
        var checkpointEvery = new Option<int>("--checkpoint-every") { Description = "Checkpoint every N steps (0: only at the end of each layer).", DefaultValueFactory = _ => 100 };
        var deterministic = new Option<bool>("--deterministic") { Description = "Deterministic algorithms (and math-only attention on CUDA) so a run repeats bit for bit.", DefaultValueFactory = _ => true };
        var tf32 = new Option<bool>("--tf32") { Description = "Allow TF32 tensor-core matmuls on CUDA.", DefaultValueFactory = _ => true };

        var recipeOptions = new Option[] { steps, layers, seqLen, batch, lr, minLr, warmup, gateWeight, klSteps, klLr, weightDecay, gradClip, evalWindows, copyFraction, copyScrambled, seed };
        var command = new Command("distill", "Distil DSLA layers from the teacher layer by layer in sensitivity order (chained), then fine-tune them end to end on logit KL.");
        foreach (var option in new Option[] { model, variant, data, device, libTorch, threads }.Concat(recipeOptions)
            .Concat(new Option[] { saveDType, samples, sensitivityLen, resume, stopAfter, logEvery, microBatch, checkpointEvery, deterministic, tf32 }))
        {
            command.Options.Add(option);
        }

        // The body runs on a worker thread so Ctrl+C cancels the token and the distiller writes a checkpoint (see TrainCommand).
        command.SetAction((result, cancellationToken) => TrainCommand.GuardAsync(() => Task.Run(() =>
        {
            var requested = new DistillationRecipe
            {
                StepsPerLayer = result.GetValue(steps),
                Layers = result.GetValue(layers),
                SeqLen = result.GetValue(seqLen),
                Batch = result.GetValue(batch),
                LearningRate = result.GetValue(lr),
                MinLearningRateRatio = result.GetValue(minLr),
                WarmupSteps = result.GetValue(warmup),
                GateLossWeight = result.GetValue(gateWeight),
                KlSteps = result.GetValue(klSteps),
                KlLearningRate = result.GetValue(klLr),
                WeightDecay = result.GetValue(weightDecay),
                GradClip = result.GetValue(gradClip),
                EvalWindows = result.GetValue(evalWindows),
                CopyFraction = result.GetValue(copyFraction),
                CopyScrambled = result.GetValue(copyScrambled),
                Seed = result.GetValue(seed),
                SaveDType = result.GetValue(saveDType)!,
            };
            var backend = new TorchBackendOptions
            {
                Device = result.GetValue(device) ?? "cpu",
                LibTorchDirectory = result.GetValue(libTorch)?.FullName,
                CpuThreads = result.GetValue(threads),
                DType = "float32",
            };
            var problems = new List<System.ComponentModel.DataAnnotations.ValidationResult>();
            if (!System.ComponentModel.DataAnnotations.Validator.TryValidateObject(backend, new(backend), problems, validateAllProperties: true))
            {
                throw new ArgumentException(string.Join("; ", problems.Select(p => p.ErrorMessage)));
            }
            using var loaded = LoadedModel.Load(result.GetValue(model)!.FullName, backend);
            var streams = DistillationData.Load(result.GetValue(data)?.FullName, loaded, train: true, filler: false);
            Console.WriteLine(string.Create(CultureInfo.InvariantCulture,
                $"Teacher: {loaded.Directory} ({loaded.Model.Config.NumHiddenLayers} layers, hidden {loaded.Model.Config.HiddenSize}) on {loaded.Model.Device}; data: {streams.Source}, {streams.Train.Length:N0} training and {streams.HeldOut.Length:N0} held-out tokens."));
            var order = ConversionOrder(loaded, streams.HeldOut, result.GetValue(samples), result.GetValue(sensitivityLen));
            var explicitOptions = ResumeConflicts.ExplicitOptions(result, recipeOptions);
            var variants = result.GetValue(variant) == "all" ? AllVariants : [result.GetValue(variant)!];
            var isCuda = backend.IsCuda;
            foreach (var name in variants)
            {
                var recipe = requested with { Variant = name };
                var checkpoint = LayerDistiller.ReadCheckpointState(loaded.Directory, name);
                var resuming = false;
                if (result.GetValue(resume))
                {
                    if (checkpoint is not null)
                    {
                        recipe = ResumeRecipe(checkpoint.Recipe, recipe, explicitOptions);
                        resuming = true;
                    }
                    else if (AlreadyDistilled(loaded.Directory, recipe, order))
                    {
                        Console.WriteLine($"{name}: already distilled with this recipe (dsla/manifest.json); skipping.");
                        continue;
                    }
                    else
                    {
                        Console.WriteLine($"{name}: no checkpoint to resume; starting.");
                    }
                }
                var run = new DistillationRunOptions
                {
                    ModelDirectory = loaded.Directory,
                    Resume = resuming,
                    LogEvery = result.GetValue(logEvery) ?? (isCuda ? 10 : 1),
                    MicroBatch = result.GetValue(microBatch) ?? (isCuda ? 0 : 2),
                    CheckpointEvery = result.GetValue(checkpointEvery),
                    StopAfter = result.GetValue(stopAfter),
                    Deterministic = result.GetValue(deterministic),
                    AllowTf32 = result.GetValue(tf32),
                    CommandLine = "dslactl " + string.Join(' ', Environment.GetCommandLineArgs().Skip(1)),
                };
                var outcome = TrainingDisplay.Run(observer => new LayerDistiller(loaded.Model, recipe, run, observer)
                    .Run(streams.Train, streams.HeldOut, order, cancellationToken));
                if (!outcome.Completed)
                {
                    Console.Error.WriteLine($"{name}: stopped at step {outcome.Step} of {outcome.TotalSteps}; checkpoint in {LayerDistiller.CheckpointFolder(loaded.Directory, name)}. Continue with: dslactl distill --model {loaded.Directory} --variant {name} --resume");
                    return ExitCodes.Cancelled;
                }
                Console.WriteLine(Summarize(name, outcome));
            }
            Console.WriteLine($"Evaluate with: dslactl eval --model {loaded.Directory}{(isCuda ? " --device cuda" : "")} --json eval.json --plot eval.png");
            return ExitCodes.Ok;
        }, CancellationToken.None)));
        return command;
    }

    /// <summary>The manifest's order when it covers every layer; else measures it and writes it (with the entropies) into the manifest.</summary>
    private static IReadOnlyList<int> ConversionOrder(LoadedModel loaded, int[] heldOut, int samples, int seqLen)
    {
        var manifest = DslaManifest.TryLoad(loaded.Directory);
        var layers = loaded.Model.Config.NumHiddenLayers;
        if (manifest is { Order.Count: > 0 } && manifest.Order.Order().SequenceEqual(Enumerable.Range(0, layers)))
        {
            Console.WriteLine($"Conversion order from {DslaManifest.PathFor(loaded.Directory)}: {string.Join(", ", manifest.Order)}.");
            return manifest.Order;
        }
        var measured = SensitivityCommand.Measure(loaded, heldOut, samples, seqLen, 4);
        SensitivityCommand.WriteOrder(loaded.Directory, measured, force: false);
        Console.WriteLine(string.Create(CultureInfo.InvariantCulture,
            $"Conversion order by attention entropy ({measured.Samples} held-out windows of {measured.SeqLen} tokens): {string.Join(", ", measured.Order)} (entropies {string.Join(", ", measured.Entropy.Select(e => e.ToString("F3", CultureInfo.InvariantCulture)))}); written to {DslaManifest.PathFor(loaded.Directory)}."));
        return measured.Order;
    }

    private static bool AlreadyDistilled(string modelDirectory, DistillationRecipe recipe, IReadOnlyList<int> order) =>
        DslaManifest.TryLoad(modelDirectory)?.Variants.TryGetValue(recipe.Variant, out var entry) == true
        && entry.Distillation?.Recipe == recipe
        && entry.Order is { } chain && chain.SequenceEqual(order.Take(recipe.LayerCount(order.Count)));

    /// <summary>The checkpoint's recipe; options given explicitly on the command line must agree with it.</summary>
    private static DistillationRecipe ResumeRecipe(DistillationRecipe saved, DistillationRecipe requested, HashSet<string> explicitOptions)
    {
        var conflicts = new ResumeConflicts(explicitOptions);
        conflicts.Check("--steps-per-layer", requested.StepsPerLayer, saved.StepsPerLayer);
        conflicts.Check("--layers", requested.Layers, saved.Layers);
        conflicts.Check("--seq-len", requested.SeqLen, saved.SeqLen);
        conflicts.Check("--batch", requested.Batch, saved.Batch);
        conflicts.Check("--lr", requested.LearningRate, saved.LearningRate);
        conflicts.Check("--min-lr-ratio", requested.MinLearningRateRatio, saved.MinLearningRateRatio);
        conflicts.Check("--warmup", requested.WarmupSteps, saved.WarmupSteps);
        conflicts.Check("--gate-loss-weight", requested.GateLossWeight, saved.GateLossWeight);
        conflicts.Check("--kl-steps", requested.KlSteps, saved.KlSteps);
        conflicts.Check("--kl-lr", requested.KlLearningRate, saved.KlLearningRate);
        conflicts.Check("--weight-decay", requested.WeightDecay, saved.WeightDecay);
        conflicts.Check("--grad-clip", requested.GradClip, saved.GradClip);
        conflicts.Check("--eval-windows", requested.EvalWindows, saved.EvalWindows);
        conflicts.Check("--copy-fraction", requested.CopyFraction, saved.CopyFraction);
        conflicts.Check("--copy-scrambled", requested.CopyScrambled, saved.CopyScrambled);
        conflicts.Check("--seed", requested.Seed, saved.Seed);
        conflicts.ThrowIfAny($"the {saved.Variant} checkpoint");
        return saved;
    }

    private static string Summarize(string variant, DistillationResult outcome)
    {
        var state = outcome.State;
        var lines = new List<string>
        {
            string.Create(CultureInfo.InvariantCulture, $"{variant}: {outcome.WeightsPath} ({state.Step} steps, {state.TokensSeen:N0} tokens, {state.ElapsedSeconds / 60:F1} min)."),
            "  pos  layer  held-out loss: initial → trained → after KL",
        };
        foreach (var record in state.Layers)
        {
            lines.Add(string.Create(CultureInfo.InvariantCulture,
                $"  {record.Position + 1,3}  {record.Layer,5}  {record.InitialLoss,10:F4} → {record.FinalLoss,7:F4} → {(record.AfterKlLoss is { } after ? after.ToString("F4", CultureInfo.InvariantCulture) : "-"),8}"));
        }
        if (state.Kl is { } kl)
        {
            lines.Add(string.Create(CultureInfo.InvariantCulture, $"  KL(teacher ‖ all {state.Layers.Count} converted): {kl.InitialKl:F4} → {kl.FinalKl:F4} nats/token"));
        }
        return string.Join(Environment.NewLine, lines);
    }
}

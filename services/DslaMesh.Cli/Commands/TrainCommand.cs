using System.CommandLine;
using System.Globalization;
using DslaMesh.Engine.Backends;
using DslaMesh.Engine.Data;
using DslaMesh.Engine.Training;

namespace DslaMesh.Cli.Commands;

/// <summary><c>dslactl train</c>: pretrain a Llama-style teacher on the Brown corpus and export it.</summary>
public static class TrainCommand
{
    /// <summary>Builds the command.</summary>
    public static Command Create()
    {
        var defaults = new TrainingRecipe();
        var output = new Option<DirectoryInfo>("--out", "-o") { Description = "Output folder: the exported model, checkpoint/ and train_log.jsonl.", Required = true };
        var data = new Option<DirectoryInfo?>("--data") { Description = $"Brown corpus folder (default: ${BrownCorpus.EnvironmentVariable}, else {BrownCorpus.DefaultRelativePath} above the current folder)." };
        var tokenizer = new Option<FileInfo?>("--tokenizer") { Description = "Use this tokenizer.json instead of training a byte-level BPE on the training documents." };
        var vocab = new Option<int>("--vocab") { Description = "BPE vocabulary size (3 specials + 256 bytes + merges).", DefaultValueFactory = _ => defaults.VocabSize };
        var layers = new Option<int>("--layers") { Description = "Decoder layers.", DefaultValueFactory = _ => defaults.Layers };
        var hidden = new Option<int>("--hidden") { Description = "Hidden size.", DefaultValueFactory = _ => defaults.HiddenSize };
        var heads = new Option<int>("--heads") { Description = "Attention heads.", DefaultValueFactory = _ => defaults.Heads };
        var kvHeads = new Option<int>("--kv-heads") { Description = "Key/value heads (grouped-query attention).", DefaultValueFactory = _ => defaults.KvHeads };
        var intermediate = new Option<int>("--intermediate") { Description = "MLP intermediate size.", DefaultValueFactory = _ => defaults.IntermediateSize };
        var context = new Option<int>("--context") { Description = "Context length (max_position_embeddings).", DefaultValueFactory = _ => defaults.Context };
        var seqLen = new Option<int?>("--seq-len") { Description = "Tokens per training sequence (default: --context)." };
        var batch = new Option<int>("--batch") { Description = "Sequences per step.", DefaultValueFactory = _ => defaults.Batch };
        var steps = new Option<int>("--steps") { Description = "Optimiser steps (overrides --epochs)." };
        var epochs = new Option<double>("--epochs") { Description = "Passes over the training tokens (when --steps is not given).", DefaultValueFactory = _ => defaults.Epochs };
        var lr = new Option<double>("--lr") { Description = "Peak learning rate.", DefaultValueFactory = _ => defaults.PeakLearningRate };
        var minLr = new Option<double>("--min-lr-ratio") { Description = "Cosine decay ends at this fraction of the peak.", DefaultValueFactory = _ => defaults.MinLearningRateRatio };
        var warmup = new Option<int>("--warmup") { Description = "Linear warmup steps.", DefaultValueFactory = _ => defaults.WarmupSteps };
        var weightDecay = new Option<double>("--weight-decay") { Description = "AdamW weight decay (matrices only).", DefaultValueFactory = _ => defaults.WeightDecay };
        var gradClip = new Option<double>("--grad-clip") { Description = "Global gradient-norm clip.", DefaultValueFactory = _ => defaults.GradClip };
        var copyFraction = new Option<double>("--copy-fraction") { Description = "Share of training windows that get spans of their own text copied further on (teaches retrieval from the context).", DefaultValueFactory = _ => defaults.CopyFraction };
        var copyScrambled = new Option<bool>("--copy-scrambled") { Description = "Copied spans repeat tokens drawn at random from the corpus, so only looking them up predicts them.", DefaultValueFactory = _ => defaults.CopyScrambled };
        var seed = new Option<long>("--seed") { Description = "Seed for initialisation and batch order.", DefaultValueFactory = _ => defaults.Seed };
        var device = new Option<string>("--device") { Description = "cpu, cuda or cuda:N.", DefaultValueFactory = _ => "cpu" };
        var libTorch = new Option<DirectoryInfo?>("--libtorch") { Description = "CUDA LibTorch folder (default: ask python3 where torch lives)." };
        var threads = new Option<int>("--threads") { Description = "CPU threads for LibTorch (0: LibTorch's default). Record it to repeat a CPU run bit for bit." };
        var evalEvery = new Option<int>("--eval-every") { Description = "Held-out evaluation every N steps (default: 20 per run)." };
        var evalTokens = new Option<int>("--eval-tokens") { Description = "Most held-out tokens per periodic evaluation (default: all)." };
        var checkpointEvery = new Option<int>("--checkpoint-every") { Description = "Checkpoint every N steps (default: at every evaluation)." };
        var logEvery = new Option<int?>("--log-every") { Description = "Progress report every N steps (default: 1 on CPU, 10 on CUDA)." };
        var export = new Option<string>("--export") { Description = "Weights to export: best (lowest held-out loss) or last.", DefaultValueFactory = _ => "best" };
        export.AcceptOnlyFromAmong("best", "last");
        var stopAfter = new Option<int>("--stop-after") { Description = "Write a checkpoint and stop after step N (continue later with --resume)." };
        var resume = new Option<bool>("--resume") { Description = "Continue the checkpoint in --out (uses its recipe; explicit options must match it)." };
        var deterministic = new Option<bool>("--deterministic") { Description = "Deterministic algorithms (and math-only attention on CUDA) so a run repeats bit for bit.", DefaultValueFactory = _ => true };
        var tf32 = new Option<bool>("--tf32") { Description = "Allow TF32 tensor-core matmuls on CUDA.", DefaultValueFactory = _ => true };

        var recipeOptions = new Option[] { vocab, layers, hidden, heads, kvHeads, intermediate, context, seqLen, batch, steps, epochs, lr, minLr, warmup, weightDecay, gradClip, copyFraction, copyScrambled, seed };
        var command = new Command("train", "Pretrain a Llama-style model from scratch on the Brown corpus and export a Hugging Face folder.");
        foreach (var option in new Option[] { output, data, tokenizer }.Concat(recipeOptions).Concat(new Option[] { device, libTorch, threads, evalEvery, evalTokens, checkpointEvery, logEvery, export, stopAfter, resume, deterministic, tf32 }))
        {
            command.Options.Add(option);
        }

        // The body runs on a worker thread so that InvokeAsync returns at once and System.CommandLine's Ctrl+C handler is
        // in place: Ctrl+C then cancels the token, and the trainer finishes its step and writes a checkpoint.
        command.SetAction((result, cancellationToken) => GuardAsync(() => Task.Run(() =>
        {
            var outDir = result.GetValue(output)!.FullName;
            var recipe = new TrainingRecipe
            {
                VocabSize = result.GetValue(vocab),
                Layers = result.GetValue(layers),
                HiddenSize = result.GetValue(hidden),
                Heads = result.GetValue(heads),
                KvHeads = result.GetValue(kvHeads),
                IntermediateSize = result.GetValue(intermediate),
                Context = result.GetValue(context),
                SeqLen = result.GetValue(seqLen) ?? result.GetValue(context),
                Batch = result.GetValue(batch),
                Steps = result.GetValue(steps),
                Epochs = result.GetValue(epochs),
                PeakLearningRate = result.GetValue(lr),
                MinLearningRateRatio = result.GetValue(minLr),
                WarmupSteps = result.GetValue(warmup),
                WeightDecay = result.GetValue(weightDecay),
                GradClip = result.GetValue(gradClip),
                CopyFraction = result.GetValue(copyFraction),
                CopyScrambled = result.GetValue(copyScrambled),
                Seed = result.GetValue(seed),
            };
            if (result.GetValue(resume))
            {
                recipe = ResumeRecipe(outDir, recipe, result, recipeOptions);
            }
            recipe.Validate();

            var backend = new TorchBackendOptions
            {
                Device = result.GetValue(device) ?? "cpu",
                LibTorchDirectory = result.GetValue(libTorch)?.FullName,
                CpuThreads = result.GetValue(threads),
            };
            var problems = new List<System.ComponentModel.DataAnnotations.ValidationResult>();
            if (!System.ComponentModel.DataAnnotations.Validator.TryValidateObject(backend, new(backend), problems, validateAllProperties: true))
            {
                throw new ArgumentException(string.Join("; ", problems.Select(p => p.ErrorMessage)));
            }

            var corpus = BrownCorpus.Load(result.GetValue(data)?.FullName);
            var trainingCorpus = new TrainingCorpus(
                $"{BrownCorpus.PackageName}@{BrownCorpus.PackageVersion}",
                corpus.Train.Select(d => d.Text).ToArray(),
                corpus.HeldOut.Select(d => d.Text).ToArray(),
                $"documents in id order (ca01 … cr09); every {BrownCorpus.HeldOutStride}th (1-based) held out; POS tags stripped, detokenised, paragraphs joined by newlines, each document followed by </s>",
                corpus.HeldOut.Select(d => d.Id).ToArray());

            var torchDevice = TorchRuntime.Initialize(backend);
            var run = new TrainingRunOptions
            {
                OutputDirectory = outDir,
                Resume = result.GetValue(resume),
                TokenizerPath = result.GetValue(tokenizer)?.FullName,
                EvalEvery = result.GetValue(evalEvery),
                EvalTokens = result.GetValue(evalTokens),
                CheckpointEvery = result.GetValue(checkpointEvery),
                LogEvery = result.GetValue(logEvery) ?? (backend.IsCuda ? 10 : 1),
                ExportBest = result.GetValue(export) != "last",
                StopAfter = result.GetValue(stopAfter),
                Deterministic = result.GetValue(deterministic),
                AllowTf32 = result.GetValue(tf32),
                CommandLine = "dslactl " + string.Join(' ', Environment.GetCommandLineArgs().Skip(1)),
            };
            var outcome = TrainingDisplay.Run(observer => new LanguageModelTrainer(recipe, run, torchDevice, observer).Run(trainingCorpus, cancellationToken));
            return Summarize(outcome);
        }, CancellationToken.None)));
        return command;
    }

    /// <summary>The checkpoint's recipe; options given explicitly on the command line must agree with it.</summary>
    private static TrainingRecipe ResumeRecipe(string outDir, TrainingRecipe requested, ParseResult result, IEnumerable<Option> recipeOptions)
    {
        var saved = LanguageModelTrainer.ReadCheckpointState(outDir)?.Recipe
            ?? throw new ArgumentException($"--resume: no checkpoint in '{Path.Combine(outDir, LanguageModelTrainer.CheckpointFolder)}'.");
        var explicitOptions = ResumeConflicts.ExplicitOptions(result, recipeOptions);
        var conflicts = new ResumeConflicts(explicitOptions);
        conflicts.Check("--vocab", requested.VocabSize, saved.VocabSize);
        conflicts.Check("--layers", requested.Layers, saved.Layers);
        conflicts.Check("--hidden", requested.HiddenSize, saved.HiddenSize);
        conflicts.Check("--heads", requested.Heads, saved.Heads);
        conflicts.Check("--kv-heads", requested.KvHeads, saved.KvHeads);
        conflicts.Check("--intermediate", requested.IntermediateSize, saved.IntermediateSize);
        conflicts.Check("--context", requested.Context, saved.Context);
        conflicts.Check("--seq-len", requested.SeqLen, saved.SeqLen);
        conflicts.Check("--batch", requested.Batch, saved.Batch);
        conflicts.Check("--steps", requested.Steps, saved.Steps);
        conflicts.Check("--epochs", requested.Epochs, saved.Epochs);
        conflicts.Check("--lr", requested.PeakLearningRate, saved.PeakLearningRate);
        conflicts.Check("--min-lr-ratio", requested.MinLearningRateRatio, saved.MinLearningRateRatio);
        conflicts.Check("--warmup", requested.WarmupSteps, saved.WarmupSteps);
        conflicts.Check("--weight-decay", requested.WeightDecay, saved.WeightDecay);
        conflicts.Check("--grad-clip", requested.GradClip, saved.GradClip);
        conflicts.Check("--copy-fraction", requested.CopyFraction, saved.CopyFraction);
        conflicts.Check("--copy-scrambled", requested.CopyScrambled, saved.CopyScrambled);
        conflicts.Check("--seed", requested.Seed, saved.Seed);
        conflicts.ThrowIfAny("the checkpoint");
        return saved;
    }

    private static int Summarize(TrainingResult outcome)
    {
        if (!outcome.Completed)
        {
            Console.Error.WriteLine($"Stopped at step {outcome.Step}; checkpoint in {Path.Combine(outcome.OutputDirectory, LanguageModelTrainer.CheckpointFolder)}. Continue with: dslactl train --out {outcome.OutputDirectory} --resume");
            return ExitCodes.Cancelled;
        }
        var m = outcome.Manifest!;
        Console.WriteLine(string.Create(CultureInfo.InvariantCulture,
            $"Model: {outcome.OutputDirectory} ({m.Parameters:N0} parameters, {m.Steps} steps, {m.TokensSeen:N0} tokens, {m.WallSeconds / 60:F1} min on {m.Device})."));
        Console.WriteLine(string.Create(CultureInfo.InvariantCulture,
            $"Exported step {m.ExportedStep} ({m.ExportedWeights}): train loss {m.Final.TrainLoss:F4} (ppl {m.Final.TrainPerplexity:F2}), held-out loss {m.Final.HeldOutLoss:F4} (ppl {m.Final.HeldOutPerplexity:F2}, {m.Final.HeldOutBitsPerByte:F3} bits/byte)."));
        Console.WriteLine($"Try it: dslactl generate -m {outcome.OutputDirectory} -p \"The jury said\" -n 64 --temperature 0.8 --top-p 0.95");
        return ExitCodes.Ok;
    }

    /// <summary>Runs the body with the CLI's error handling, plus the data and device errors training can hit.</summary>
    internal static Task<int> GuardAsync(Func<Task<int>> body) => EngineOptions.GuardAsync(async () =>
    {
        try
        {
            return await body().ConfigureAwait(false);
        }
        catch (CorpusNotFoundException e)
        {
            await Console.Error.WriteLineAsync($"error: {e.Message}").ConfigureAwait(false);
            return ExitCodes.DataError;
        }
        catch (Exception e) when (e is InvalidOperationException or IOException or UnauthorizedAccessException)
        {
            await Console.Error.WriteLineAsync($"error: {e.Message}").ConfigureAwait(false);
            return ExitCodes.DataError;
        }
    });
}

using System.Diagnostics;
using System.Text;
using System.Text.Json;
using DslaMesh.Engine.Backends;
using DslaMesh.Engine.Checkpoints;
using DslaMesh.Engine.Models;
using DslaMesh.Engine.Tokenization;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace DslaMesh.Engine.Training;

/// <summary>
/// Pretrains a Llama-style model from scratch on a text corpus: trains (or takes) a byte-level BPE tokenizer, draws
/// seeded batches, optimises next-token cross-entropy with AdamW under a warmup + cosine schedule, evaluates held-out
/// loss, writes resumable checkpoints and finally exports a Hugging Face model folder with a training manifest.
/// </summary>
/// <remarks>
/// Output folder: <c>config.json</c>, <c>model.safetensors</c> (float16), <c>tokenizer.json</c>,
/// <c>generation_config.json</c>, <c>training_manifest.json</c>, <c>README.md</c> (model card with the reproduction
/// commands), <c>train_log.jsonl</c>, and <c>checkpoint/</c>
/// (<c>model.safetensors</c> float32 weights, <c>optimizer.bin</c> AdamW moments and step counts, <c>best.safetensors</c>
/// the best held-out weights, <c>state.json</c> step, recipe, tokenizer hash). The sampler is a pure function of
/// (seed, step) and the checkpoint holds exact float32 weights and moments, so a resumed run computes the same steps
/// as an uninterrupted one.
/// </remarks>
public sealed class LanguageModelTrainer
{
    private readonly TrainingRecipe _recipe;
    private readonly TrainingRunOptions _run;
    private readonly Device _device;
    private readonly ITrainingObserver _observer;

    public LanguageModelTrainer(TrainingRecipe recipe, TrainingRunOptions run, Device device, ITrainingObserver? observer = null)
    {
        ArgumentNullException.ThrowIfNull(recipe);
        ArgumentNullException.ThrowIfNull(run);
        recipe.Validate();
        _recipe = recipe;
        _run = run;
        _device = device;
        _observer = observer ?? NullObserver.Instance;
    }

    /// <summary>Checkpoint subfolder of the output folder.</summary>
    public const string CheckpointFolder = "checkpoint";

    /// <summary>Reads the recipe of the checkpoint in <paramref name="outputDirectory"/>, or null when there is none.</summary>
    public static CheckpointState? ReadCheckpointState(string outputDirectory)
    {
        var path = Path.Combine(outputDirectory, CheckpointFolder, "state.json");
        if (!File.Exists(path))
        {
            return null;
        }
        try
        {
            return JsonSerializer.Deserialize(File.ReadAllText(path), TrainingJsonContext.Default.CheckpointState);
        }
        catch (JsonException e)
        {
            throw new ModelLoadException($"'{path}' is not a valid checkpoint state: {e.Message}", e);
        }
    }

    /// <summary>Runs (or resumes) training to the last step, or until cancelled / <see cref="TrainingRunOptions.StopAfter"/>.</summary>
    public TrainingResult Run(TrainingCorpus corpus, CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(corpus);
        var session = Stopwatch.StartNew();
        var outDir = Path.GetFullPath(_run.OutputDirectory);
        Directory.CreateDirectory(outDir);
        var checkpointDir = Path.Combine(outDir, CheckpointFolder);
        var resume = PrepareResume(outDir);

        var determinism = _run.Deterministic ? TorchDeterminism.Enable(_device.type == DeviceType.CUDA) : null;
        if (_device.type == DeviceType.CUDA)
        {
            backends.cuda.matmul.allow_tf32 = _run.AllowTf32;
            backends.cudnn.allow_tf32 = _run.AllowTf32;
        }

        // Tokenizer and data.
        var tokenizerPath = PrepareTokenizer(outDir, corpus, resume);
        var tokenizerHash = ModelExport.Sha256(tokenizerPath);
        if (resume is not null && resume.TokenizerSha256 != tokenizerHash)
        {
            throw new ArgumentException($"'{tokenizerPath}' is not the tokenizer the checkpoint was trained with (sha256 differs).");
        }
        var info = TokenizerInfo.Read(tokenizerPath);
        int[] trainStream;
        int[] heldOutStream;
        using (var tokenizer = TextTokenizer.Load(tokenizerPath))
        {
            trainStream = TrainingSteps.Encode(tokenizer, corpus.Train, info.EosId);
            heldOutStream = TrainingSteps.Encode(tokenizer, corpus.HeldOut, info.EosId);
        }
        if (resume is not null && resume.TrainTokens != trainStream.Length)
        {
            throw new ArgumentException($"The training data encodes to {trainStream.Length} tokens; the checkpoint was trained on {resume.TrainTokens}. Resume with the same data.");
        }
        var windows = new TokenWindows(trainStream, _recipe.SeqLen, _recipe.Seed, _recipe.CopyFraction, _recipe.CopyScrambled);
        var totalSteps = _recipe.Steps > 0 ? _recipe.Steps : Math.Max(1, (int)Math.Ceiling(_recipe.Epochs * windows.WindowsPerEpoch / _recipe.Batch));
        var evalEvery = _run.EvalEvery > 0 ? _run.EvalEvery : Math.Max(1, totalSteps / 20);
        var checkpointEvery = _run.CheckpointEvery > 0 ? _run.CheckpointEvery : evalEvery;
        var logEvery = Math.Max(1, _run.LogEvery);
        var tokensPerStep = (long)_recipe.Batch * _recipe.SeqLen;
        _observer.OnMessage(string.Create(System.Globalization.CultureInfo.InvariantCulture,
            $"Data: {corpus.Name}, {corpus.Train.Count} training documents ({trainStream.Length:N0} tokens), {corpus.HeldOut.Count} held-out ({heldOutStream.Length:N0} tokens); {windows.WindowsPerEpoch} windows of {_recipe.SeqLen} per epoch; {totalSteps} steps of {tokensPerStep:N0} tokens ({(double)totalSteps * _recipe.Batch / windows.WindowsPerEpoch:F2} epochs)."));

        var config = _recipe.ToConfig(info.VocabSize) with { BosTokenId = info.BosId, EosTokenIds = [info.EosId] };
        using var model = new LlamaForCausalLM(config, ScalarType.Float32, _device);
        var named = model.CheckpointTensors().OrderBy(kv => kv.Key, StringComparer.Ordinal).ToArray();
        var parameterCount = named.Sum(kv => kv.Value.NumberOfElements);
        if (resume is null)
        {
            ModelInitializer.Initialize(model, _recipe.Seed, _recipe.InitStd);
        }
        else
        {
            LoadWeights(model, Path.Combine(checkpointDir, "model.safetensors"));
        }
        var parameters = model.parameters().ToArray();
        foreach (var parameter in parameters)
        {
            parameter.requires_grad = true;
        }
        _observer.OnMessage($"Model: {config.NumHiddenLayers} layers, hidden {config.HiddenSize}, {config.NumAttentionHeads} heads ({config.NumKeyValueHeads} KV), MLP {config.IntermediateSize}, vocab {config.VocabSize}, context {config.MaxPositionEmbeddings}: {parameterCount:N0} parameters on {_device}.");

        // Decoupled weight decay on matrices only; the norm scales are left alone.
        var decayed = named.Where(kv => !kv.Key.EndsWith("norm.weight", StringComparison.Ordinal)).Select(kv => (Parameter)kv.Value).ToArray();
        var undecayed = named.Where(kv => kv.Key.EndsWith("norm.weight", StringComparison.Ordinal)).Select(kv => (Parameter)kv.Value).ToArray();
        using var optimizer = optim.AdamW(
            new AdamW.ParamGroup[]
            {
                new AdamW.ParamGroup(decayed, lr: _recipe.PeakLearningRate, beta1: _recipe.Beta1, beta2: _recipe.Beta2, eps: _recipe.AdamEpsilon, weight_decay: _recipe.WeightDecay),
                new AdamW.ParamGroup(undecayed, lr: _recipe.PeakLearningRate, beta1: _recipe.Beta1, beta2: _recipe.Beta2, eps: _recipe.AdamEpsilon, weight_decay: 0),
            },
            lr: _recipe.PeakLearningRate, beta1: _recipe.Beta1, beta2: _recipe.Beta2, eps: _recipe.AdamEpsilon, weight_decay: _recipe.WeightDecay);
        if (resume is not null)
        {
            optimizer.load_state_dict(Path.Combine(checkpointDir, "optimizer.bin"));
        }

        var state = resume ?? new CheckpointState
        {
            TotalSteps = totalSteps,
            TokenizerSha256 = tokenizerHash,
            TrainTokens = trainStream.Length,
            Sampler = "epoch-permutation/splitmix64: window i of the run = perm(seed, i div K)[i mod K], offset(seed, epoch)",
            Recipe = _recipe,
        };
        state.TotalSteps = totalSteps;
        var best = resume is not null && File.Exists(Path.Combine(checkpointDir, "best.safetensors"))
            ? ReadCpuWeights(Path.Combine(checkpointDir, "best.safetensors"))
            : null;
        var logPath = Path.Combine(outDir, "train_log.jsonl");
        PrepareLog(logPath, state.Step, fresh: resume is null);
        if (resume is not null)
        {
            _observer.OnMessage($"Resumed from {checkpointDir} at step {state.Step} of {totalSteps}.");
        }

        var baseElapsed = state.ElapsedSeconds;
        var sessionStartStep = state.Step;
        var lastReport = Stopwatch.StartNew();
        var lastReportStep = state.Step;
        var pausedSeconds = 0.0;
        double? firstLoss = null;
        var lastLoss = double.NaN;
        var lossSum = zeros(1, dtype: ScalarType.Float32, device: _device).DetachFromDisposeScope();
        var lastNorm = zeros(1, dtype: ScalarType.Float32, device: _device).DetachFromDisposeScope();
        try
        {
            model.train();
            while (state.Step < totalSteps)
            {
                if (cancellationToken.IsCancellationRequested)
                {
                    SaveCheckpoint(checkpointDir, model, optimizer, best, state, baseElapsed + session.Elapsed.TotalSeconds);
                    return new TrainingResult(false, state.Step, outDir, null, firstLoss ?? double.NaN, lastLoss);
                }
                var lr = LearningRate(state.Step, totalSteps);
                foreach (var group in optimizer.ParamGroups)
                {
                    group.LearningRate = lr;
                }
                using (var scope = NewDisposeScope())
                {
                    var batch = tensor(windows.Batch(state.Step, _recipe.Batch), _recipe.Batch, _recipe.SeqLen + 1).to(_device);
                    var inputs = batch.narrow(1, 0, _recipe.SeqLen);
                    var targets = batch.narrow(1, 1, _recipe.SeqLen);
                    var logits = model.Forward(inputs);
                    var loss = nn.functional.cross_entropy(logits.view(-1, config.VocabSize), targets.reshape(-1));
                    loss.backward();
                    var norm = TrainingSteps.ClipGradients(parameters, _recipe.GradClip);
                    optimizer.step();
                    optimizer.zero_grad();
                    using (no_grad())
                    {
                        lossSum.add_(loss.detach().view(1));
                        lastNorm.copy_(norm.view(1));
                    }
                }
                state.Step++;
                state.TokensSeen += tokensPerStep;

                if (state.Step % logEvery == 0 || state.Step == totalSteps)
                {
                    var steps = state.Step - lastReportStep;
                    var seconds = Math.Max(1e-9, lastReport.Elapsed.TotalSeconds - pausedSeconds);
                    pausedSeconds = 0;
                    var meanLoss = lossSum.item<float>() / steps;
                    var gradNorm = lastNorm.item<float>();
                    lossSum.zero_();
                    firstLoss ??= meanLoss;
                    lastLoss = meanLoss;
                    var sessionSteps = state.Step - sessionStartStep;
                    var remaining = TimeSpan.FromSeconds(session.Elapsed.TotalSeconds / sessionSteps * (totalSteps - state.Step));
                    var progress = new TrainingProgress(state.Step, totalSteps, meanLoss, gradNorm, lr, steps * tokensPerStep / seconds, state.TokensSeen,
                        (double)state.Step * _recipe.Batch / windows.WindowsPerEpoch, TimeSpan.FromSeconds(baseElapsed + session.Elapsed.TotalSeconds), remaining);
                    _observer.OnProgress(progress);
                    AppendLog(logPath, new TrainLogLine { Step = state.Step, Loss = meanLoss, LearningRate = lr, GradNorm = gradNorm, TokensPerSecond = progress.TokensPerSecond, ElapsedSeconds = progress.Elapsed.TotalSeconds });
                    lastReport.Restart();
                    lastReportStep = state.Step;
                }

                if (state.Step % evalEvery == 0 || state.Step == totalSteps)
                {
                    var evaluating = Stopwatch.StartNew();
                    var heldOut = Evaluate(model, heldOutStream, _run.EvalTokens);
                    var isBest = state.BestHeldOutLoss is not { } previous || heldOut.Loss < previous;
                    if (isBest)
                    {
                        state.BestHeldOutLoss = heldOut.Loss;
                        state.BestStep = state.Step;
                        DisposeAll(best);
                        best = CopyToCpu(model);
                    }
                    _observer.OnEvaluation(new EvaluationResult(state.Step, heldOut.Loss, heldOut.Tokens, isBest));
                    AppendLog(logPath, new TrainLogLine { Step = state.Step, HeldOutLoss = heldOut.Loss, ElapsedSeconds = baseElapsed + session.Elapsed.TotalSeconds });
                    pausedSeconds += evaluating.Elapsed.TotalSeconds;   // not training throughput
                }

                var stopping = _run.StopAfter > 0 && state.Step >= _run.StopAfter && state.Step < totalSteps;
                if (state.Step % checkpointEvery == 0 || state.Step == totalSteps || stopping)
                {
                    var saving = Stopwatch.StartNew();
                    SaveCheckpoint(checkpointDir, model, optimizer, best, state, baseElapsed + session.Elapsed.TotalSeconds);
                    pausedSeconds += saving.Elapsed.TotalSeconds;   // not training throughput
                }
                if (stopping)
                {
                    return new TrainingResult(false, state.Step, outDir, null, firstLoss ?? double.NaN, lastLoss);
                }
            }

            model.eval();
            var manifest = Export(outDir, model, best, state, config, corpus, info, tokenizerHash, trainStream, heldOutStream, parameterCount,
                baseElapsed + session.Elapsed.TotalSeconds, determinism, logPath);
            return new TrainingResult(true, state.Step, outDir, manifest, firstLoss ?? double.NaN, lastLoss);
        }
        finally
        {
            lossSum.Dispose();
            lastNorm.Dispose();
            DisposeAll(best);
        }
    }

    /// <summary>Learning rate for the step about to run (0-based): linear warmup, then cosine to min_lr_ratio · peak.</summary>
    public double LearningRate(int step, int totalSteps) =>
        TrainingSteps.CosineLearningRate(step, totalSteps, _recipe.PeakLearningRate, _recipe.WarmupSteps, _recipe.MinLearningRateRatio);

    private CheckpointState? PrepareResume(string outDir)
    {
        var existing = ReadCheckpointState(outDir);
        if (!_run.Resume)
        {
            if (existing is not null)
            {
                throw new ArgumentException($"'{outDir}' already holds a training checkpoint (step {existing.Step}); pass --resume to continue it, or choose another --out.");
            }
            return null;
        }
        if (existing is null)
        {
            throw new ArgumentException($"--resume: no checkpoint in '{Path.Combine(outDir, CheckpointFolder)}'.");
        }
        if (existing.Recipe != _recipe)
        {
            throw new ArgumentException($"--resume: the checkpoint was trained with another recipe ({Describe(existing.Recipe)}); this run asks for ({Describe(_recipe)}).");
        }
        return existing;
    }

    private static string Describe(TrainingRecipe recipe) => JsonSerializer.Serialize(recipe, TrainLogJsonContext.Default.TrainingRecipe);

    private string PrepareTokenizer(string outDir, TrainingCorpus corpus, CheckpointState? resume)
    {
        var path = Path.Combine(outDir, "tokenizer.json");
        if (_run.TokenizerPath is { } given)
        {
            if (!File.Exists(given))
            {
                throw new ModelLoadException($"Tokenizer not found: '{given}'.");
            }
            if (!string.Equals(Path.GetFullPath(given), path, StringComparison.Ordinal))
            {
                File.Copy(given, path, overwrite: true);
            }
            _observer.OnMessage($"Tokenizer: {given}.");
            return path;
        }
        if (resume is not null)
        {
            return File.Exists(path) ? path : throw new ModelLoadException($"--resume: '{path}' is missing.");
        }
        var watch = Stopwatch.StartNew();
        var vocabulary = new BpeTrainer(_recipe.VocabSize).Train(corpus.Train);
        vocabulary.WriteTokenizerJson(path);
        _observer.OnMessage($"Tokenizer: trained byte-level BPE on the training documents, {vocabulary.Count} tokens ({vocabulary.Merges.Count} merges) in {watch.Elapsed.TotalSeconds:F1} s.");
        return path;
    }

    private (double Loss, long Tokens) Evaluate(LlamaForCausalLM model, int[] stream, int maxTokens) =>
        TrainingSteps.HeldOutLoss(model, stream, _recipe.SeqLen, maxTokens, _recipe.Batch);

    private void SaveCheckpoint(string directory, LlamaForCausalLM model, AdamW optimizer, Dictionary<string, Tensor>? best, CheckpointState state, double elapsedSeconds)
    {
        state.ElapsedSeconds = elapsedSeconds;
        var temp = directory + ".tmp";
        if (Directory.Exists(temp))
        {
            Directory.Delete(temp, recursive: true);
        }
        Directory.CreateDirectory(temp);
        SafeTensorsFile.Write(Path.Combine(temp, "model.safetensors"), model.CheckpointTensors());
        optimizer.save_state_dict(Path.Combine(temp, "optimizer.bin"));
        if (best is not null)
        {
            SafeTensorsFile.Write(Path.Combine(temp, "best.safetensors"), best, new Dictionary<string, string> { ["step"] = state.BestStep.ToString(System.Globalization.CultureInfo.InvariantCulture) });
        }
        File.WriteAllText(Path.Combine(temp, "state.json"), TrainingJson.Serialize(state));
        CheckpointFolders.Commit(temp, directory);
        _observer.OnCheckpoint(state.Step, directory);
    }

    private TrainingManifest Export(string outDir, LlamaForCausalLM model, Dictionary<string, Tensor>? best, CheckpointState state, LlamaConfig config,
        TrainingCorpus corpus, TokenizerInfo info, string tokenizerHash, int[] trainStream, int[] heldOutStream, long parameterCount, double wallSeconds,
        DeterminismSettings? determinism, string logPath)
    {
        var useBest = _run.ExportBest && best is not null;
        var exportedStep = useBest ? state.BestStep : state.Step;
        IReadOnlyDictionary<string, Tensor> weights = useBest ? best! : model.CheckpointTensors();
        var weightsPath = Path.Combine(outDir, "model.safetensors");
        ModelExport.WriteWeights(weightsPath, weights, new Dictionary<string, string> { ["step"] = exportedStep.ToString(System.Globalization.CultureInfo.InvariantCulture) });
        ModelExport.WriteConfig(Path.Combine(outDir, "config.json"), config);
        ModelExport.WriteGenerationConfig(Path.Combine(outDir, "generation_config.json"), config);

        // Measure what ships: the float16 weights, loaded back the way the engine loads them.
        _observer.OnMessage($"Exported the {(useBest ? "best held-out" : "last")} weights (step {exportedStep}) to {outDir}; evaluating them ...");
        TrainingManifest manifest;
        using (var exported = LlamaForCausalLM.Load(outDir, ScalarType.Float32, _device))
        {
            exported.eval();
            var heldOut = Evaluate(exported, heldOutStream, 0);
            var train = Evaluate(exported, trainStream, (int)Math.Min(heldOut.Tokens, int.MaxValue));
            var heldOutBytes = corpus.HeldOut.Sum(d => (long)Encoding.UTF8.GetByteCount(d));
            manifest = new TrainingManifest
            {
                Command = _run.CommandLine,
                Seed = _recipe.Seed,
                Recipe = _recipe,
                Data = new ManifestData
                {
                    Name = corpus.Name,
                    Split = corpus.Split,
                    TrainDocuments = corpus.Train.Count,
                    HeldOutDocuments = corpus.HeldOut.Count,
                    HeldOutIds = corpus.HeldOutIds,
                    TrainTokens = trainStream.Length,
                    HeldOutTokens = heldOutStream.Length,
                    TrainBytes = corpus.Train.Sum(d => (long)Encoding.UTF8.GetByteCount(d)),
                    HeldOutBytes = heldOutBytes,
                },
                Tokenizer = new ManifestTokenizer
                {
                    VocabSize = info.VocabSize,
                    Merges = info.Merges,
                    TrainedOn = _run.TokenizerPath is null ? $"{corpus.Name} training documents" : $"given: {Path.GetFileName(_run.TokenizerPath)}",
                    Sha256 = tokenizerHash,
                },
                Parameters = parameterCount,
                Steps = state.Step,
                TokensSeen = state.TokensSeen,
                EpochsSeen = (double)state.TokensSeen / Math.Max(1, trainStream.Length),
                ExportedStep = exportedStep,
                ExportedWeights = useBest ? "best held-out loss" : "last step",
                WeightsSha256 = ModelExport.Sha256(weightsPath),
                Final = new ManifestMetrics
                {
                    TrainLoss = train.Loss,
                    TrainPerplexity = Math.Exp(train.Loss),
                    TrainEvalTokens = train.Tokens,
                    HeldOutLoss = heldOut.Loss,
                    HeldOutPerplexity = Math.Exp(heldOut.Loss),
                    // Every held-out token but the first is predicted once; their bytes are (almost) all held-out bytes.
                    HeldOutBitsPerByte = heldOut.Loss * heldOut.Tokens / Math.Log(2) / Math.Max(1, heldOutBytes + corpus.HeldOut.Count),
                    HeldOutEvalTokens = heldOut.Tokens,
                },
                Evaluations = ReadEvaluations(logPath),
                WallSeconds = wallSeconds,
                Device = _device.ToString(),
                DeviceName = _device.type == DeviceType.CPU ? TrainingSteps.CpuName() : null,
                CpuThreads = get_num_threads(),
                TorchSharp = typeof(torch).Assembly.GetName().Version?.ToString() ?? "",
                Determinism = determinism,
                Tf32 = _device.type == DeviceType.CUDA && _run.AllowTf32,
            };
        }
        File.WriteAllText(Path.Combine(outDir, "training_manifest.json"), TrainingJson.Serialize(manifest) + "\n");
        ModelCard.Write(outDir, manifest);
        return manifest;
    }

    private static void LoadWeights(LlamaForCausalLM model, string path)
    {
        using var file = SafeTensorsFile.Open(path);
        using var noGrad = no_grad();
        foreach (var (name, target) in model.CheckpointTensors())
        {
            using var loaded = file.Read(name);
            if (!loaded.shape.SequenceEqual(target.shape))
            {
                throw new ModelLoadException($"'{path}': tensor '{name}' has shape [{string.Join(", ", loaded.shape)}], the model needs [{string.Join(", ", target.shape)}].");
            }
            target.copy_(loaded);
        }
    }

    private static Dictionary<string, Tensor> ReadCpuWeights(string path)
    {
        using var file = SafeTensorsFile.Open(path);
        return file.Entries.Keys.ToDictionary(name => name, name => file.Read(name).DetachFromDisposeScope(), StringComparer.Ordinal);
    }

    private static Dictionary<string, Tensor> CopyToCpu(LlamaForCausalLM model)
    {
        // The scope holds the detach()/cpu() temporaries until the copies are made: an unreferenced temporary can be
        // finalised (its TensorImpl deleted) while LibTorch still copies from it, which crashed CUDA runs at a checkpoint.
        using var scope = NewDisposeScope();
        return model.CheckpointTensors().ToDictionary(kv => kv.Key, kv => kv.Value.detach().cpu().clone().DetachFromDisposeScope(), StringComparer.Ordinal);
    }

    private static void DisposeAll(Dictionary<string, Tensor>? weights)
    {
        if (weights is null)
        {
            return;
        }
        foreach (var tensor in weights.Values)
        {
            tensor.Dispose();
        }
    }

    private static void PrepareLog(string path, int step, bool fresh)
    {
        if (fresh || !File.Exists(path))
        {
            File.WriteAllText(path, string.Empty);
            return;
        }
        // Steps after the checkpoint will run again; drop their lines.
        var kept = File.ReadAllLines(path).Where(line =>
        {
            try
            {
                return JsonSerializer.Deserialize(line, TrainLogJsonContext.Default.TrainLogLine) is { } entry && entry.Step <= step;
            }
            catch (JsonException)
            {
                return false;
            }
        });
        File.WriteAllLines(path, kept);
    }

    private static void AppendLog(string path, TrainLogLine line) =>
        File.AppendAllText(path, JsonSerializer.Serialize(line, TrainLogJsonContext.Default.TrainLogLine) + "\n");

    private static List<ManifestEvaluation> ReadEvaluations(string path) =>
        File.ReadLines(path)
            .Select(line => JsonSerializer.Deserialize(line, TrainLogJsonContext.Default.TrainLogLine))
            .Where(entry => entry?.HeldOutLoss is not null)
            .Select(entry => new ManifestEvaluation { Step = entry!.Step, HeldOutLoss = entry.HeldOutLoss!.Value })
            .ToList();

    private sealed class NullObserver : ITrainingObserver
    {
        public static readonly NullObserver Instance = new();
    }
}

/// <summary>What the trainer needs to know about a tokenizer.json: vocabulary size, merges, special ids.</summary>
/// <param name="VocabSize">1 + the largest token id (model vocabulary and added tokens).</param>
/// <param name="Merges">Number of BPE merges.</param>
/// <param name="BosId">Id of <c>&lt;s&gt;</c>, if present.</param>
/// <param name="EosId">Id of <c>&lt;/s&gt;</c>.</param>
public sealed record TokenizerInfo(int VocabSize, int Merges, int? BosId, int EosId)
{
    /// <summary>Reads a tokenizer.json.</summary>
    /// <exception cref="ModelLoadException">Not a BPE tokenizer.json with an <c>&lt;/s&gt;</c> token.</exception>
    public static TokenizerInfo Read(string path)
    {
        try
        {
            using var document = JsonDocument.Parse(File.ReadAllBytes(path));
            var root = document.RootElement;
            var ids = new Dictionary<string, int>(StringComparer.Ordinal);
            var model = root.GetProperty("model");
            foreach (var entry in model.GetProperty("vocab").EnumerateObject())
            {
                ids[entry.Name] = entry.Value.GetInt32();
            }
            if (root.TryGetProperty("added_tokens", out var added) && added.ValueKind == JsonValueKind.Array)
            {
                foreach (var token in added.EnumerateArray())
                {
                    ids[token.GetProperty("content").GetString() ?? ""] = token.GetProperty("id").GetInt32();
                }
            }
            var merges = model.TryGetProperty("merges", out var m) && m.ValueKind == JsonValueKind.Array ? m.GetArrayLength() : 0;
            var eos = ids.TryGetValue("</s>", out var e) ? e : throw new ModelLoadException($"'{path}' has no '</s>' token to end documents with.");
            return new TokenizerInfo(ids.Values.Max() + 1, merges, ids.TryGetValue("<s>", out var b) ? b : null, eos);
        }
        catch (Exception ex) when (ex is JsonException or KeyNotFoundException or InvalidOperationException)
        {
            throw new ModelLoadException($"'{path}' is not a tokenizer.json the trainer understands: {ex.Message}", ex);
        }
    }
}

using System.Diagnostics;
using System.Globalization;
using DslaMesh.Engine.Backends;
using DslaMesh.Engine.Dsla;
using DslaMesh.Engine.Models;
using DslaMesh.Engine.Training;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace DslaMesh.Engine.Distillation;

/// <summary>
/// Distils one DSLA variant from a teacher with the paper's chained schedule (dsla-paper.md §2.1): layers are converted
/// one at a time in sensitivity order; layer n is initialised from its teacher attention (q/k/v/o copied), trained to
/// reproduce the teacher attention block's output on the input it receives in the hybrid whose layers 1 … n − 1 are
/// already DSLA (frozen), then frozen itself. A short end-to-end stage follows: logit KL(teacher ‖ hybrid with every
/// converted layer), training only DSLA parameters. The teacher's weights never change.
/// </summary>
/// <remarks>
/// Layer objective: NMSE(y, t) + λ·cos(exp g¹, exp g²), where y is the DSLA layer's output and t the teacher softmax
/// attention's output (o_proj applied, residual not added) on the same x_k = input_layernorm_k(h_k),
/// NMSE = Σ(y − t)² / Σt² over the batch, and the cosine similarity of the two gate sets' decay values is averaged over
/// (batch, KV head, token); it pushes the history and recency gates apart (dual-state variants only; GLA has one gate).
/// Output: <c>dsla/&lt;variant&gt;.safetensors</c> and the variant's entry in <c>dsla/manifest.json</c>. Checkpoints:
/// <c>dsla/checkpoint-&lt;variant&gt;/</c> (state.json, weights.safetensors of every layer added so far, optimizer.bin of
/// the current stage), removed when the run completes. The training windows are a pure function of (seed, step), and
/// the checkpoint holds exact fp32 weights and AdamW moments, so a resumed run repeats an uninterrupted one.
/// </remarks>
public sealed class LayerDistiller
{
    /// <summary>What the per-layer losses measure, for the manifest.</summary>
    public const string LossDescription =
        "held-out NMSE = sum((y - t)^2) / sum(t^2) of the attention block output (after o_proj, before the residual add) against the teacher softmax attention on the same input, in the chained hybrid";

    private readonly LlamaForCausalLM _model;
    private readonly DistillationRecipe _recipe;
    private readonly DistillationRunOptions _run;
    private readonly ITrainingObserver _observer;

    public LayerDistiller(LlamaForCausalLM model, DistillationRecipe recipe, DistillationRunOptions run, ITrainingObserver? observer = null)
    {
        ArgumentNullException.ThrowIfNull(model);
        ArgumentNullException.ThrowIfNull(recipe);
        ArgumentNullException.ThrowIfNull(run);
        if (model.DType != ScalarType.Float32)
        {
            throw new ArgumentException($"Distillation trains in float32; the model was loaded as {model.DType}.", nameof(model));
        }
        recipe.Validate(model.ContextLength);
        _model = model;
        _recipe = recipe;
        _run = run;
        _observer = observer ?? NullObserver.Instance;
    }

    /// <summary>The checkpoint folder of a variant's run.</summary>
    public static string CheckpointFolder(string modelDirectory, string variant) =>
        Path.Combine(modelDirectory, DslaManifest.FolderName, $"checkpoint-{variant}");

    /// <summary>The weights file name of a variant, relative to <c>dsla/</c>.</summary>
    public static string WeightsFileName(string variant) => $"{variant}.safetensors";

    /// <summary>Reads a variant's checkpoint state, or null when there is none.</summary>
    /// <exception cref="ModelLoadException">The state file is malformed.</exception>
    public static DistillationState? ReadCheckpointState(string modelDirectory, string variant)
    {
        var path = Path.Combine(CheckpointFolder(modelDirectory, variant), "state.json");
        if (!File.Exists(path))
        {
            return null;
        }
        try
        {
            return DistillationJson.DeserializeState(File.ReadAllText(path));
        }
        catch (System.Text.Json.JsonException e)
        {
            throw new ModelLoadException($"'{path}' is not a valid distillation checkpoint state: {e.Message}", e);
        }
    }

    /// <summary>
    /// Runs (or resumes) the chained distillation of the recipe's variant over the first <see cref="DistillationRecipe.Layers"/>
    /// layers of <paramref name="order"/> (all by default), drawing training windows from <paramref name="trainStream"/> and
    /// measuring held-out losses on <paramref name="heldOutStream"/>. Stops early (writing a checkpoint) when cancelled or
    /// at <see cref="DistillationRunOptions.StopAfter"/>.
    /// </summary>
    public DistillationResult Run(int[] trainStream, int[] heldOutStream, IReadOnlyList<int> order, CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(trainStream);
        ArgumentNullException.ThrowIfNull(heldOutStream);
        ArgumentNullException.ThrowIfNull(order);
        CheckOrder(order);
        var session = Stopwatch.StartNew();
        var variantName = DslaVariants.Name(_recipe.ParsedVariant);
        var checkpointDir = CheckpointFolder(_run.ModelDirectory, variantName);
        var converting = order.Take(_recipe.LayerCount(order.Count)).ToArray();
        var totalSteps = _recipe.TotalSteps(order.Count);
        var teacherSha = TeacherSha256(_run.ModelDirectory);
        var resume = PrepareResume(order, trainStream.Length, teacherSha);

        var cuda = _model.Device.type == DeviceType.CUDA;
        var determinism = _run.Deterministic ? TorchDeterminism.Enable(cuda) : null;
        if (cuda)
        {
            backends.cuda.matmul.allow_tf32 = _run.AllowTf32;
            backends.cudnn.allow_tf32 = _run.AllowTf32;
        }

        var windows = new TokenWindows(trainStream, _recipe.SeqLen, _recipe.Seed, _recipe.CopyFraction, _recipe.CopyScrambled);
        using var evalIds = LayerSensitivity.Batch(LayerSensitivity.EvenlySpacedWindows(heldOutStream, _recipe.EvalWindows, _recipe.SeqLen), _model.Device);
        var state = resume ?? new DistillationState
        {
            Recipe = _recipe,
            Order = [.. order],
            TrainTokens = trainStream.Length,
            TeacherSha256 = teacherSha,
        };
        _observer.OnMessage(string.Create(CultureInfo.InvariantCulture,
            $"Distilling {variantName}: {converting.Length} layers in order [{string.Join(", ", converting)}], {_recipe.StepsPerLayer} steps per layer, then {_recipe.KlSteps} KL steps; {_recipe.Batch} × {_recipe.SeqLen} tokens per step ({totalSteps} steps, {(double)totalSteps * _recipe.Batch / windows.WindowsPerEpoch:F2} epochs of {trainStream.Length:N0} training tokens) on {_model.Device}."));
        if (resume is not null)
        {
            _observer.OnMessage($"Resumed from {checkpointDir} at step {state.Step} of {totalSteps} ({state.Stage}, position {state.Position}, stage step {state.StageStep}).");
        }

        using var set = OpenSet(checkpointDir, resume, converting);
        var clock = new RunClock(state.ElapsedSeconds, state.Step, session);
        while (state.Stage == DistillationStage.Layers && state.Position < converting.Length)
        {
            if (StopAtBoundary(set, state, clock, checkpointDir, cancellationToken)
                || !TrainLayer(set, converting, state, windows, evalIds, totalSteps, clock, checkpointDir, cancellationToken))
            {
                return new DistillationResult(false, state.Step, totalSteps, "", state);
            }
        }
        if (state.Stage == DistillationStage.Layers)
        {
            state.Stage = DistillationStage.Kl;
            state.StageStep = 0;
            state.StageSeconds = 0;
        }
        if (_recipe.KlSteps > 0 && state.StageStep < _recipe.KlSteps
            && (StopAtBoundary(set, state, clock, checkpointDir, cancellationToken)
                || !TrainKl(set, state, windows, evalIds, totalSteps, clock, checkpointDir, cancellationToken)))
        {
            return new DistillationResult(false, state.Step, totalSteps, "", state);
        }
        state.Stage = DistillationStage.Done;
        state.ElapsedSeconds = clock.Elapsed;
        var weightsPath = Finish(set, converting, state, determinism, teacherSha, evalIds);
        if (Directory.Exists(checkpointDir))
        {
            Directory.Delete(checkpointDir, recursive: true);
        }
        return new DistillationResult(true, state.Step, totalSteps, weightsPath, state);
    }

    /// <summary>
    /// Held-out distillation loss of <paramref name="mixer"/> standing in for layer <paramref name="layer"/>, with the layers
    /// of <paramref name="prefixMix"/> converted before it: Σ(y − t)² / Σt² over all windows, and the mean gate cosine
    /// (0 for single-state mixers). <paramref name="ids"/> [N, T] is processed <paramref name="batch"/> rows at a time.
    /// </summary>
    public static (double Loss, double GateCosine) EvaluateLayer(LlamaForCausalLM model, GatedLinearMixer mixer, int layer, IReadOnlyList<bool>? prefixMix, Tensor ids, int batch)
    {
        ArgumentNullException.ThrowIfNull(model);
        ArgumentNullException.ThrowIfNull(mixer);
        ArgumentNullException.ThrowIfNull(ids);
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        var error = zeros(1, dtype: ScalarType.Float64, device: model.Device);
        var energy = zeros(1, dtype: ScalarType.Float64, device: model.Device);
        var cosine = zeros(1, dtype: ScalarType.Float64, device: model.Device);
        var rows = ids.shape[0];
        for (long start = 0; start < rows; start += batch)
        {
            using var inner = NewDisposeScope();
            var count = Math.Min(batch, rows - start);
            using var capture = HybridForward.CaptureLayer(model, ids.narrow(0, start, count), layer, prefixMix);
            var (output, _) = mixer.Run(capture.Input);
            var target = capture.Target!.to(ScalarType.Float32);
            error.add_((output.to(ScalarType.Float32) - target).pow(2).sum().to(ScalarType.Float64));
            energy.add_(target.pow(2).sum().to(ScalarType.Float64));
            if (mixer.StateCount == 2)
            {
                cosine.add_(GateCosine(mixer.LogGates(capture.Input)).to(ScalarType.Float64) * count);
            }
        }
        return (error.item<double>() / Math.Max(energy.item<double>(), 1e-30), cosine.item<double>() / rows);
    }

    /// <summary>
    /// Held-out KL(teacher ‖ hybrid) per token (nats) with the layers of <paramref name="mix"/> running as DSLA;
    /// <paramref name="ids"/> [N, T] is processed <paramref name="batch"/> rows at a time.
    /// </summary>
    public static double EvaluateKl(LlamaForCausalLM model, IReadOnlyList<bool> mix, Tensor ids, int batch)
    {
        ArgumentNullException.ThrowIfNull(model);
        ArgumentNullException.ThrowIfNull(ids);
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        var sum = zeros(1, dtype: ScalarType.Float64, device: model.Device);
        var rows = ids.shape[0];
        for (long start = 0; start < rows; start += batch)
        {
            using var inner = NewDisposeScope();
            var count = Math.Min(batch, rows - start);
            var chunk = ids.narrow(0, start, count);
            using var teacher = model.Forward(chunk).to(ScalarType.Float32).log_softmax(-1);
            using var student = model.Forward(chunk, null, mix).to(ScalarType.Float32).log_softmax(-1);
            sum.add_(TokenKl(teacher, student).to(ScalarType.Float64) * count);
        }
        return sum.item<double>() / rows;
    }

    /// <summary>Σ(y − t)² / Σt², in fp32.</summary>
    public static Tensor NormalizedMse(Tensor output, Tensor target)
    {
        ArgumentNullException.ThrowIfNull(output);
        ArgumentNullException.ThrowIfNull(target);
        using var scope = NewDisposeScope();
        var t = target.to(ScalarType.Float32);
        var loss = (output.to(ScalarType.Float32) - t).pow(2).sum() / t.pow(2).sum().clamp_min(1e-12);
        return loss.MoveToOuterDisposeScope();
    }

    /// <summary>Mean cosine similarity between two gate sets' decay values exp(logGate), over the key dimension.</summary>
    public static Tensor GateCosine(IReadOnlyList<Tensor> logGates)
    {
        ArgumentNullException.ThrowIfNull(logGates);
        using var scope = NewDisposeScope();
        return nn.functional.cosine_similarity(logGates[0].exp(), logGates[1].exp(), dim: -1).mean().MoveToOuterDisposeScope();
    }

    /// <summary>Mean over tokens of KL(p ‖ q) = Σ_v p (log p − log q), from log-probabilities [..., V].</summary>
    public static Tensor TokenKl(Tensor teacherLogProbs, Tensor studentLogProbs)
    {
        ArgumentNullException.ThrowIfNull(teacherLogProbs);
        ArgumentNullException.ThrowIfNull(studentLogProbs);
        using var scope = NewDisposeScope();
        return (teacherLogProbs.exp() * (teacherLogProbs - studentLogProbs)).sum(-1).mean().MoveToOuterDisposeScope();
    }

    private bool TrainLayer(DslaLayerSet set, int[] converting, DistillationState state, TokenWindows windows, Tensor evalIds, int totalSteps,
        RunClock clock, string checkpointDir, CancellationToken cancellationToken)
    {
        var position = state.Position;
        var layer = converting[position];
        var prefixMix = set.Mix(converting.Take(position));
        var stageClock = Stopwatch.StartNew();
        var stageBase = state.StageSeconds;
        GatedLinearMixer mixer;
        var fresh = state.StageStep == 0;
        if (fresh)
        {
            mixer = set.Add(layer, _recipe.Seed + layer);
            state.CurrentInitialLoss = EvaluateLayer(_model, mixer, layer, prefixMix, evalIds, _recipe.Batch).Loss;
        }
        else
        {
            mixer = set[layer];
        }
        _observer.OnMessage(string.Create(CultureInfo.InvariantCulture,
            $"Layer {layer} ({position + 1}/{converting.Length}){(position > 0 ? $", after [{string.Join(", ", converting.Take(position))}]" : "")}: held-out loss at initialisation {state.CurrentInitialLoss:F4}{(fresh ? "" : $"; resuming at step {state.StageStep}")}."));
        var parameters = mixer.TrainableParameters().ToArray();
        var dual = mixer.StateCount == 2 && _recipe.GateLossWeight > 0;
        var trainLoss = double.NaN;
        mixer.SetTrainable(true);
        try
        {
            using var optimizer = CreateOptimizer(parameters, _recipe.LearningRate);
            if (!fresh)
            {
                optimizer.load_state_dict(Path.Combine(checkpointDir, "optimizer.bin"));
            }
            var stopped = Loop(state, _recipe.StepsPerLayer, _recipe.LearningRate, parameters, optimizer, windows, totalSteps, clock, checkpointDir, set,
                stageClock, stageBase, ids =>
                {
                    // The frozen prefix runs once for the whole batch (no graph); the DSLA layer runs per micro-batch. The
                    // NMSE denominator is the whole batch's, so the parts add up to the full-batch objective.
                    var capture = HybridForward.CaptureLayer(_model, ids, layer, prefixMix);
                    var energy = capture.Target!.to(ScalarType.Float32).pow(2).sum().clamp_min(1e-12);
                    return (start, count) =>
                    {
                        using var scope = NewDisposeScope();
                        var x = capture.Input.narrow(0, start, count);
                        var (output, _) = mixer.Run(x);
                        var part = (output.to(ScalarType.Float32) - capture.Target.narrow(0, start, count).to(ScalarType.Float32)).pow(2).sum() / energy;
                        if (dual)
                        {
                            part = part + (GateCosine(mixer.LogGates(x)) * (_recipe.GateLossWeight * count / ids.shape[0]));
                        }
                        return part.MoveToOuterDisposeScope();
                    };
                }, mean => trainLoss = mean, cancellationToken);
            if (stopped)
            {
                return false;
            }
        }
        finally
        {
            mixer.SetTrainable(false);
        }
        var (final, cosine) = EvaluateLayer(_model, mixer, layer, prefixMix, evalIds, _recipe.Batch);
        var record = new LayerRecord
        {
            Layer = layer,
            Position = position,
            InitialLoss = state.CurrentInitialLoss,
            FinalLoss = final,
            TrainLoss = trainLoss,
            GateCosine = cosine,
            Gamma = mixer switch
            {
                DslaAttention d => d.Gamma,
                FoldableDslaAttention f => f.Gamma,
                _ => null,
            },
            Steps = _recipe.StepsPerLayer,
            Seconds = stageBase + stageClock.Elapsed.TotalSeconds,
        };
        state.Layers.Add(record);
        _observer.OnMessage(string.Create(CultureInfo.InvariantCulture,
            $"Layer {layer} done: held-out loss {record.InitialLoss:F4} → {record.FinalLoss:F4}{(mixer.StateCount == 2 ? $", gate cosine {cosine:F3}, γ {record.Gamma:F3}" : "")} ({record.Seconds:F1} s)."));
        state.Position++;
        state.StageStep = 0;
        state.StageSeconds = 0;
        SaveCheckpoint(checkpointDir, set, null, state, clock.Elapsed);
        return true;
    }

    private bool TrainKl(DslaLayerSet set, DistillationState state, TokenWindows windows, Tensor evalIds, int totalSteps, RunClock clock,
        string checkpointDir, CancellationToken cancellationToken)
    {
        var mix = set.MixAll();
        var stageClock = Stopwatch.StartNew();
        var stageBase = state.StageSeconds;
        var fresh = state.StageStep == 0;
        if (fresh)
        {
            state.KlInitial = EvaluateKl(_model, mix, evalIds, _recipe.Batch);
        }
        _observer.OnMessage(string.Create(CultureInfo.InvariantCulture,
            $"End-to-end stage: KL(teacher ‖ hybrid of {set.Layers.Count} DSLA layers) on held-out windows {state.KlInitial:F4} nats/token{(fresh ? "" : $"; resuming at step {state.StageStep}")}."));
        var parameters = set.Layers.SelectMany(l => set[l].TrainableParameters()).ToArray();
        var trainKl = double.NaN;
        set.SetTrainable(true);
        try
        {
            using var optimizer = CreateOptimizer(parameters, _recipe.KlLearningRate);
            if (!fresh)
            {
                optimizer.load_state_dict(Path.Combine(checkpointDir, "optimizer.bin"));
            }
            var stopped = Loop(state, _recipe.KlSteps, _recipe.KlLearningRate, parameters, optimizer, windows, totalSteps, clock, checkpointDir, set,
                stageClock, stageBase, ids =>
                {
                    Tensor teacher;
                    using (no_grad())
                    {
                        teacher = _model.Forward(ids).to(ScalarType.Float32).log_softmax(-1);
                    }
                    return (start, count) =>
                    {
                        using var scope = NewDisposeScope();
                        var student = _model.Forward(ids.narrow(0, start, count), null, mix).to(ScalarType.Float32).log_softmax(-1);
                        return (TokenKl(teacher.narrow(0, start, count), student) * ((double)count / ids.shape[0])).MoveToOuterDisposeScope();
                    };
                }, mean => trainKl = mean, cancellationToken);
            if (stopped)
            {
                return false;
            }
        }
        finally
        {
            set.SetTrainable(false);
        }
        var final = EvaluateKl(_model, mix, evalIds, _recipe.Batch);
        state.Kl = new KlRecord
        {
            Steps = _recipe.KlSteps,
            InitialKl = state.KlInitial,
            FinalKl = final,
            TrainKl = trainKl,
            Seconds = stageBase + stageClock.Elapsed.TotalSeconds,
        };
        _observer.OnMessage(string.Create(CultureInfo.InvariantCulture,
            $"End-to-end stage done: held-out KL {state.KlInitial:F4} → {final:F4} nats/token ({state.Kl.Seconds:F1} s)."));
        return true;
    }

    /// <summary>
    /// The optimisation loop of one stage, from <see cref="DistillationState.StageStep"/> to <paramref name="steps"/>.
    /// <paramref name="objective"/> prepares a step's batch (ids [B, T]) and returns the loss of rows
    /// [start, start + count) scaled so that the parts of a batch add up to its loss; each part is back-propagated on its
    /// own (<see cref="DistillationRunOptions.MicroBatch"/> rows at a time), which bounds the activation memory without
    /// changing the step. Returns true when it stopped early (cancelled or at StopAfter; a checkpoint is written).
    /// </summary>
    private bool Loop(DistillationState state, int steps, double peakLr, Parameter[] parameters, AdamW optimizer, TokenWindows windows, int totalSteps,
        RunClock clock, string checkpointDir, DslaLayerSet set, Stopwatch stageClock, double stageBase, Func<Tensor, Func<long, long, Tensor>> objective, Action<double> reportMean,
        CancellationToken cancellationToken)
    {
        var tokensPerStep = (long)_recipe.Batch * _recipe.SeqLen;
        var logEvery = Math.Max(1, _run.LogEvery);
        var lossSum = zeros(1, dtype: ScalarType.Float32, device: _model.Device).DetachFromDisposeScope();
        var lastNorm = zeros(1, dtype: ScalarType.Float32, device: _model.Device).DetachFromDisposeScope();
        var interval = Stopwatch.StartNew();
        var intervalSteps = 0;
        try
        {
            while (state.StageStep < steps)
            {
                // A stage always takes its first step here (Run stops at stage boundaries), so the checkpoint's weights
                // hold exactly the layers its state names.
                if (state.StageStep > 0 && (cancellationToken.IsCancellationRequested || (_run.StopAfter > 0 && state.Step >= _run.StopAfter)))
                {
                    state.StageSeconds = stageBase + stageClock.Elapsed.TotalSeconds;
                    SaveCheckpoint(checkpointDir, set, optimizer, state, clock.Elapsed);
                    return true;
                }
                var lr = TrainingSteps.CosineLearningRate(state.StageStep, steps, peakLr, _recipe.WarmupSteps, _recipe.MinLearningRateRatio);
                foreach (var group in optimizer.ParamGroups)
                {
                    group.LearningRate = lr;
                }
                using (var scope = NewDisposeScope())
                {
                    var batch = tensor(windows.Batch(state.Step, _recipe.Batch), _recipe.Batch, _recipe.SeqLen + 1).to(_model.Device);
                    var part = objective(batch.narrow(1, 0, _recipe.SeqLen));
                    var micro = _run.MicroBatch > 0 ? Math.Min(_run.MicroBatch, _recipe.Batch) : _recipe.Batch;
                    for (var start = 0; start < _recipe.Batch; start += micro)
                    {
                        using var inner = NewDisposeScope();
                        var loss = part(start, Math.Min(micro, _recipe.Batch - start));
                        loss.backward();
                        using (no_grad())
                        {
                            lossSum.add_(loss.detach().to(ScalarType.Float32).view(1));
                        }
                    }
                    var norm = TrainingSteps.ClipGradients(parameters, _recipe.GradClip);
                    optimizer.step();
                    optimizer.zero_grad();
                    using (no_grad())
                    {
                        lastNorm.copy_(norm.view(1));
                    }
                }
                state.Step++;
                state.StageStep++;
                state.TokensSeen += tokensPerStep;
                intervalSteps++;

                if (state.StageStep % logEvery == 0 || state.StageStep == steps)
                {
                    var mean = lossSum.item<float>() / intervalSteps;
                    lossSum.zero_();
                    reportMean(mean);
                    var seconds = Math.Max(1e-9, interval.Elapsed.TotalSeconds);
                    _observer.OnProgress(new TrainingProgress(state.Step, totalSteps, mean, lastNorm.item<float>(), lr, intervalSteps * tokensPerStep / seconds,
                        state.TokensSeen, (double)state.TokensSeen / Math.Max(1, windows.Tokens.Length), TimeSpan.FromSeconds(clock.Elapsed), clock.Remaining(state.Step, totalSteps)));
                    interval.Restart();
                    intervalSteps = 0;
                }
                if (_run.CheckpointEvery > 0 && state.Step % _run.CheckpointEvery == 0 && state.StageStep < steps)
                {
                    var saving = Stopwatch.StartNew();
                    state.StageSeconds = stageBase + stageClock.Elapsed.TotalSeconds;
                    SaveCheckpoint(checkpointDir, set, optimizer, state, clock.Elapsed);
                    interval.Restart();
                    clock.Pause(saving.Elapsed);
                }
            }
            return false;
        }
        finally
        {
            lossSum.Dispose();
            lastNorm.Dispose();
        }
    }

    /// <summary>
    /// Between stages: when cancelled or past StopAfter, writes a checkpoint (the set then holds exactly the finished
    /// layers) and returns true.
    /// </summary>
    private bool StopAtBoundary(DslaLayerSet set, DistillationState state, RunClock clock, string checkpointDir, CancellationToken cancellationToken)
    {
        if (!cancellationToken.IsCancellationRequested && (_run.StopAfter <= 0 || state.Step < _run.StopAfter))
        {
            return false;
        }
        SaveCheckpoint(checkpointDir, set, null, state, clock.Elapsed);
        return true;
    }

    private AdamW CreateOptimizer(Parameter[] parameters, double lr) => optim.AdamW(
        parameters, lr: lr, beta1: _recipe.Beta1, beta2: _recipe.Beta2, eps: _recipe.AdamEpsilon, weight_decay: _recipe.WeightDecay);

    private DslaLayerSet OpenSet(string checkpointDir, DistillationState? resume, int[] converting)
    {
        var weights = Path.Combine(checkpointDir, "weights.safetensors");
        if (resume is null || !File.Exists(weights))
        {
            if (resume is not null && (resume.Position > 0 || resume.StageStep > 0))
            {
                throw new ModelLoadException($"'{checkpointDir}' has no weights.safetensors for the layers its state says are done.");
            }
            return DslaLayerSet.Create(_model, _recipe.ParsedVariant);
        }
        var set = DslaLayerSet.Load(_model, weights);
        try
        {
            var expected = resume.Stage == DistillationStage.Layers
                ? converting.Take(resume.Position + (resume.StageStep > 0 ? 1 : 0))
                : converting;
            if (set.Variant != _recipe.ParsedVariant || !set.Layers.SequenceEqual(expected.Order()))
            {
                throw new ModelLoadException($"'{weights}' holds {set.VariantName} layers [{string.Join(", ", set.Layers)}], but the checkpoint state expects [{string.Join(", ", expected.Order())}].");
            }
            set.SetTrainable(false);
            return set;
        }
        catch
        {
            set.Dispose();
            throw;
        }
    }

    private DistillationState? PrepareResume(IReadOnlyList<int> order, int trainTokens, string teacherSha)
    {
        var variant = DslaVariants.Name(_recipe.ParsedVariant);
        var existing = ReadCheckpointState(_run.ModelDirectory, variant);
        var folder = CheckpointFolder(_run.ModelDirectory, variant);
        if (!_run.Resume)
        {
            if (existing is not null)
            {
                throw new ArgumentException($"'{folder}' holds an unfinished {variant} distillation (step {existing.Step}); pass --resume to continue it, or delete the folder to start over.");
            }
            return null;
        }
        if (existing is null)
        {
            throw new ArgumentException($"--resume: no {variant} distillation checkpoint in '{folder}'.");
        }
        if (existing.Recipe != _recipe)
        {
            throw new ArgumentException($"--resume: the {variant} checkpoint was made with another recipe; resume with the same options (see {Path.Combine(folder, "state.json")}).");
        }
        if (!existing.Order.SequenceEqual(order))
        {
            throw new ArgumentException($"--resume: the {variant} checkpoint follows the order [{string.Join(", ", existing.Order)}], not [{string.Join(", ", order)}].");
        }
        if (existing.TrainTokens != trainTokens)
        {
            throw new ArgumentException($"--resume: the training data encodes to {trainTokens} tokens; the checkpoint was trained on {existing.TrainTokens}. Resume with the same data.");
        }
        if (existing.TeacherSha256 != teacherSha)
        {
            throw new ArgumentException("--resume: the teacher's weights differ from those the checkpoint was distilled from.");
        }
        return existing;
    }

    private void SaveCheckpoint(string directory, DslaLayerSet set, AdamW? optimizer, DistillationState state, double elapsedSeconds)
    {
        state.ElapsedSeconds = elapsedSeconds;
        var temp = directory + ".tmp";
        if (Directory.Exists(temp))
        {
            Directory.Delete(temp, recursive: true);
        }
        Directory.CreateDirectory(temp);
        if (set.Layers.Count > 0)
        {
            set.Save(Path.Combine(temp, "weights.safetensors"));
        }
        optimizer?.save_state_dict(Path.Combine(temp, "optimizer.bin"));
        File.WriteAllText(Path.Combine(temp, "state.json"), DistillationJson.Serialize(state) + "\n");
        CheckpointFolders.Commit(temp, directory);
        _observer.OnCheckpoint(state.Step, directory);
    }

    private string Finish(DslaLayerSet set, int[] converting, DistillationState state, DeterminismSettings? determinism, string teacherSha, Tensor evalIds)
    {
        // Each layer's loss in the final weights, in the chained hybrid (the layers before it in the order converted).
        if (state.Kl is not null)
        {
            for (var i = 0; i < state.Layers.Count; i++)
            {
                var record = state.Layers[i];
                record.AfterKlLoss = EvaluateLayer(_model, set[record.Layer], record.Layer, set.Mix(converting.Take(i)), evalIds, _recipe.Batch).Loss;
            }
        }
        var variant = DslaVariants.Name(_recipe.ParsedVariant);
        var folder = Path.Combine(_run.ModelDirectory, DslaManifest.FolderName);
        Directory.CreateDirectory(folder);
        var fileName = WeightsFileName(variant);
        var weightsPath = Path.Combine(folder, fileName);
        var temp = weightsPath + ".tmp";
        set.Save(temp, _recipe.ParsedSaveDType);
        File.Move(temp, weightsPath, overwrite: true);

        var entry = new DslaVariantEntry
        {
            File = fileName,
            Layers = [.. set.Layers],
            Losses = state.Layers.ToDictionary(r => r.Layer.ToString(CultureInfo.InvariantCulture), r => r.AfterKlLoss ?? r.FinalLoss, StringComparer.Ordinal),
            TokensSeen = state.TokensSeen,
            Order = [.. converting],
            Steps = state.Step,
            WallSeconds = state.ElapsedSeconds,
            Device = _model.Device.ToString(),
            Distillation = new DistillationSummary
            {
                Command = _run.CommandLine,
                Recipe = _recipe,
                Loss = LossDescription,
                LayerRecords = state.Layers,
                Kl = state.Kl,
                DeviceName = _model.Device.type == DeviceType.CPU ? TrainingSteps.CpuName() : null,
                CpuThreads = get_num_threads(),
                TorchSharp = typeof(torch).Assembly.GetName().Version?.ToString() ?? "",
                Determinism = determinism,
                Tf32 = _model.Device.type == DeviceType.CUDA && _run.AllowTf32,
                TeacherSha256 = teacherSha,
                WeightsSha256 = ModelExport.Sha256(weightsPath),
            },
        };
        // Re-read just before writing so runs of other variants that finished meanwhile keep their entries.
        var manifest = DslaManifest.TryLoad(_run.ModelDirectory) ?? new DslaManifest();
        if (manifest.Order.Count == 0)
        {
            manifest.Order = [.. state.Order];
        }
        else if (!manifest.Order.Take(converting.Length).SequenceEqual(converting))
        {
            _observer.OnMessage($"Warning: the manifest's conversion order [{string.Join(", ", manifest.Order)}] does not start with the order this variant was distilled in [{string.Join(", ", converting)}]; serving follows the manifest's order.");
        }
        manifest.Variants[variant] = entry;
        manifest.Save(_run.ModelDirectory);
        _observer.OnMessage($"Wrote {weightsPath} and {DslaManifest.PathFor(_run.ModelDirectory)}.");
        return weightsPath;
    }

    private void CheckOrder(IReadOnlyList<int> order)
    {
        if (order.Count == 0)
        {
            throw new ArgumentException("The conversion order is empty.", nameof(order));
        }
        if (order.Any(l => l < 0 || l >= _model.Layers.Count) || order.Distinct().Count() != order.Count)
        {
            throw new ArgumentException($"The conversion order [{string.Join(", ", order)}] must list distinct layers of 0 … {_model.Layers.Count - 1}.", nameof(order));
        }
    }

    private static string TeacherSha256(string modelDirectory)
    {
        var weights = Path.Combine(modelDirectory, "model.safetensors");
        return File.Exists(weights) ? ModelExport.Sha256(weights) : "";
    }

    /// <summary>Training time over all sessions of a run (checkpoint writing excluded from the rate) and the ETA.</summary>
    private sealed class RunClock(double baseSeconds, int sessionStartStep, Stopwatch session)
    {
        private double _paused;

        public double Elapsed => baseSeconds + session.Elapsed.TotalSeconds;

        public void Pause(TimeSpan span) => _paused += span.TotalSeconds;

        public TimeSpan Remaining(int step, int totalSteps)
        {
            var steps = step - sessionStartStep;
            return steps <= 0 ? TimeSpan.Zero : TimeSpan.FromSeconds(Math.Max(0, session.Elapsed.TotalSeconds - _paused) / steps * (totalSteps - step));
        }
    }

    private sealed class NullObserver : ITrainingObserver
    {
        public static readonly NullObserver Instance = new();
    }
}

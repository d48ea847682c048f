using System.Text.Json.Serialization;
using DslaMesh.Engine.Backends;
using DslaMesh.Engine.Dsla;

namespace DslaMesh.Engine.Distillation;

/// <summary>
/// Everything that determines a distillation run's result for one variant: the schedule, the losses and the optimiser.
/// Saved in the checkpoint and the manifest; a resumed run must use the same values. Defaults are the recipe
/// docs/distillation.md describes.
/// </summary>
public sealed record DistillationRecipe
{
    /// <summary>The variant's wire name (dsla, dsla-foldable, gla).</summary>
    [JsonPropertyName("variant")] public string Variant { get; init; } = "dsla";

    /// <summary>Optimiser steps per converted layer (the layer-wise stage).</summary>
    [JsonPropertyName("steps_per_layer")] public int StepsPerLayer { get; init; } = 300;

    /// <summary>Layers to convert, in sensitivity order (0: all).</summary>
    [JsonPropertyName("layers")] public int Layers { get; init; }

    /// <summary>Tokens per training window.</summary>
    [JsonPropertyName("seq_len")] public int SeqLen { get; init; } = 2048;

    /// <summary>Windows per optimiser step.</summary>
    [JsonPropertyName("batch")] public int Batch { get; init; } = 8;

    /// <summary>Peak learning rate of the layer-wise stage (per layer: warmup, then cosine).</summary>
    [JsonPropertyName("lr")] public double LearningRate { get; init; } = 1e-3;

    /// <summary>Each cosine decay ends at this fraction of its peak.</summary>
    [JsonPropertyName("min_lr_ratio")] public double MinLearningRateRatio { get; init; } = 0.1;

    /// <summary>Linear warmup steps at the start of each layer and of the KL stage.</summary>
    [JsonPropertyName("warmup_steps")] public int WarmupSteps { get; init; } = 20;

    /// <summary>λ: weight of the cosine similarity between the two gate sets' exp(logGate) (dual-state variants only).</summary>
    [JsonPropertyName("gate_loss_weight")] public double GateLossWeight { get; init; } = 0.1;

    /// <summary>Optimiser steps of the end-to-end stage: logit KL(teacher ‖ hybrid with every converted layer).</summary>
    [JsonPropertyName("kl_steps")] public int KlSteps { get; init; } = 200;

    /// <summary>Peak learning rate of the KL stage.</summary>
    [JsonPropertyName("kl_lr")] public double KlLearningRate { get; init; } = 3e-4;

    /// <summary>AdamW decoupled weight decay (0: none, so the teacher-copied projections are not pulled towards zero).</summary>
    [JsonPropertyName("weight_decay")] public double WeightDecay { get; init; }
    [JsonPropertyName("beta1")] public double Beta1 { get; init; } = 0.9;
    [JsonPropertyName("beta2")] public double Beta2 { get; init; } = 0.95;
    [JsonPropertyName("adam_eps")] public double AdamEpsilon { get; init; } = 1e-8;

    /// <summary>Global L2 gradient-norm clip.</summary>
    [JsonPropertyName("grad_clip")] public double GradClip { get; init; } = 1.0;

    /// <summary>Held-out windows (of <see cref="SeqLen"/>) each layer's loss and the KL are measured on.</summary>
    [JsonPropertyName("eval_windows")] public int EvalWindows { get; init; } = 8;

    /// <summary>Share of training windows with copied spans (<see cref="Training.CopySpans"/>), as the teacher was trained.</summary>
    [JsonPropertyName("copy_fraction")] public double CopyFraction { get; init; }

    /// <summary>Copied spans repeat tokens drawn at random from the corpus instead of the window's own text.</summary>
    [JsonPropertyName("copy_scrambled")] public bool CopyScrambled { get; init; } = true;

    /// <summary>Seeds the DSLA initialisation (layer i uses seed + i) and the training windows.</summary>
    [JsonPropertyName("seed")] public long Seed { get; init; } = 1234;

    /// <summary>
    /// Storage type of the weights file written at the end: float32, float16 or bfloat16 (training is fp32 whatever it
    /// is; the mixing scalars γ stay fp32). Checkpoints for resuming are always fp32.
    /// </summary>
    [JsonPropertyName("save_dtype")] public string SaveDType { get; init; } = "float32";

    /// <summary>The parsed variant.</summary>
    [JsonIgnore] public DslaVariant ParsedVariant => DslaVariants.Parse(Variant);

    /// <summary>The parsed <see cref="SaveDType"/>.</summary>
    [JsonIgnore] public TorchSharp.torch.ScalarType ParsedSaveDType => TorchRuntime.ParseDType(SaveDType) ?? throw new ArgumentException(SaveDTypeError);

    private string SaveDTypeError => $"--save-dtype must be float32, float16 or bfloat16, got '{SaveDType}'.";

    /// <summary>Steps in the whole run for a model whose conversion order has <paramref name="orderLength"/> layers.</summary>
    public int TotalSteps(int orderLength) => (LayerCount(orderLength) * StepsPerLayer) + KlSteps;

    /// <summary>Layers this recipe converts out of an order of <paramref name="orderLength"/>.</summary>
    public int LayerCount(int orderLength) => Layers > 0 ? Math.Min(Layers, orderLength) : orderLength;

    /// <summary>Checks the values fit together.</summary>
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
        _ = DslaVariants.Parse(Variant);
        Require(StepsPerLayer >= 1, "--steps-per-layer must be positive.");
        Require(Layers >= 0, "--layers must not be negative.");
        Require(SeqLen >= 2 && SeqLen <= contextLength, $"--seq-len must be between 2 and the model's context ({contextLength}), got {SeqLen}.");
        Require(Batch >= 1, "--batch must be positive.");
        Require(LearningRate > 0 && KlLearningRate > 0, "--lr and --kl-lr must be positive.");
        Require(MinLearningRateRatio is >= 0 and <= 1, "--min-lr-ratio must be in [0, 1].");
        Require(WarmupSteps >= 0, "--warmup must not be negative.");
        Require(GateLossWeight >= 0, "--gate-loss-weight must not be negative.");
        Require(KlSteps >= 0, "--kl-steps must not be negative.");
        Require(WeightDecay >= 0, "--weight-decay must not be negative.");
        Require(GradClip > 0, "--grad-clip must be positive.");
        Require(EvalWindows >= 1, "--eval-windows must be positive.");
        Require(CopyFraction is >= 0 and <= 1, "--copy-fraction must be in [0, 1].");
        Require(TorchRuntime.ParseDType(SaveDType) is not null, SaveDTypeError);
    }
}

/// <summary>How one invocation runs a recipe: where, how often it reports, when it stops. Does not change the result.</summary>
public sealed record DistillationRunOptions
{
    /// <summary>The teacher's model folder; <c>dsla/</c> inside it receives the weights, manifest and checkpoints.</summary>
    public required string ModelDirectory { get; init; }

    /// <summary>Continue the variant's checkpoint.</summary>
    public bool Resume { get; init; }

    /// <summary>Report progress every this many steps (each report synchronises with the device).</summary>
    public int LogEvery { get; init; } = 10;

    /// <summary>
    /// Rows per forward/backward pass within a step (0: the whole batch). The parts add up to the full-batch loss, so this
    /// bounds activation memory without changing the update (up to float summation order). The KL stage keeps the DSLA
    /// activations of every converted layer for the backward pass: about 3 GiB per layer for 8 × 2048 tokens of the
    /// default model.
    /// </summary>
    public int MicroBatch { get; init; }

    /// <summary>Write a checkpoint every this many steps (0: only at the end of each layer and when stopped).</summary>
    public int CheckpointEvery { get; init; } = 100;

    /// <summary>Stop after this global step (a checkpoint is written), as if interrupted; 0 = run to the end.</summary>
    public int StopAfter { get; init; }

    /// <summary>Turn on LibTorch's deterministic algorithms (and math-only attention on CUDA).</summary>
    public bool Deterministic { get; init; } = true;

    /// <summary>Let CUDA matmuls use TF32 tensor cores.</summary>
    public bool AllowTf32 { get; init; } = true;

    /// <summary>The command line, for the manifest.</summary>
    public string? CommandLine { get; init; }
}

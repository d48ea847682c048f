using System.Text.Json.Serialization;
using DslaMesh.Engine.Models;

namespace DslaMesh.Engine.Training;

/// <summary>
/// Everything that determines a pretraining run's result: architecture, tokenizer size, data sampling and optimiser
/// hyperparameters. Saved in the checkpoint and the manifest; a resumed run must use the same values.
/// </summary>
public sealed record TrainingRecipe
{
    [JsonPropertyName("vocab_size")] public int VocabSize { get; init; } = 4096;
    [JsonPropertyName("layers")] public int Layers { get; init; } = 8;
    [JsonPropertyName("hidden_size")] public int HiddenSize { get; init; } = 256;
    [JsonPropertyName("heads")] public int Heads { get; init; } = 4;
    [JsonPropertyName("kv_heads")] public int KvHeads { get; init; } = 2;
    [JsonPropertyName("intermediate_size")] public int IntermediateSize { get; init; } = 704;
    [JsonPropertyName("context")] public int Context { get; init; } = 2048;
    [JsonPropertyName("rope_theta")] public double RopeTheta { get; init; } = 10000.0;
    [JsonPropertyName("rms_norm_eps")] public double RmsNormEps { get; init; } = 1e-5;

    /// <summary>Tokens per training sequence (≤ context).</summary>
    [JsonPropertyName("seq_len")] public int SeqLen { get; init; } = 2048;

    /// <summary>Sequences per optimiser step.</summary>
    [JsonPropertyName("batch")] public int Batch { get; init; } = 8;

    /// <summary>Optimiser steps; 0 = derive from <see cref="Epochs"/>.</summary>
    [JsonPropertyName("steps")] public int Steps { get; init; }

    /// <summary>Passes over the training tokens, used when <see cref="Steps"/> is 0.</summary>
    [JsonPropertyName("epochs")] public double Epochs { get; init; } = 10;

    [JsonPropertyName("peak_lr")] public double PeakLearningRate { get; init; } = 2e-3;

    /// <summary>The cosine decay ends at this fraction of the peak.</summary>
    [JsonPropertyName("min_lr_ratio")] public double MinLearningRateRatio { get; init; } = 0.1;

    /// <summary>Linear warmup steps.</summary>
    [JsonPropertyName("warmup_steps")] public int WarmupSteps { get; init; } = 100;

    /// <summary>AdamW decoupled weight decay on matrices (embeddings included; norm scales excluded).</summary>
    [JsonPropertyName("weight_decay")] public double WeightDecay { get; init; } = 0.1;
    [JsonPropertyName("beta1")] public double Beta1 { get; init; } = 0.9;
    [JsonPropertyName("beta2")] public double Beta2 { get; init; } = 0.95;
    [JsonPropertyName("adam_eps")] public double AdamEpsilon { get; init; } = 1e-8;

    /// <summary>Global L2 gradient-norm clip.</summary>
    [JsonPropertyName("grad_clip")] public double GradClip { get; init; } = 1.0;

    /// <summary>Standard deviation of the normal initialisation (residual output projections get std / √(2·layers)).</summary>
    [JsonPropertyName("init_std")] public double InitStd { get; init; } = 0.02;

    /// <summary>Share of training windows that get copied spans (<see cref="CopySpans"/>), so the model learns to retrieve from its context.</summary>
    [JsonPropertyName("copy_fraction")] public double CopyFraction { get; init; }

    /// <summary>Copied spans repeat tokens drawn at random from the corpus instead of the window's own text.</summary>
    [JsonPropertyName("copy_scrambled")] public bool CopyScrambled { get; init; } = true;

    /// <summary>Seeds initialisation and batch sampling.</summary>
    [JsonPropertyName("seed")] public long Seed { get; init; } = 1234;

    /// <summary>The Llama architecture this recipe trains (tied embeddings, no biases, SiLU, default RoPE).</summary>
    public LlamaConfig ToConfig(int vocabSize) => new()
    {
        VocabSize = vocabSize,
        HiddenSize = HiddenSize,
        IntermediateSize = IntermediateSize,
        NumHiddenLayers = Layers,
        NumAttentionHeads = Heads,
        NumKeyValueHeads = KvHeads,
        HeadDim = HiddenSize / Heads,
        RmsNormEps = RmsNormEps,
        MaxPositionEmbeddings = Context,
        TieWordEmbeddings = true,
        Rope = new RopeSettings("default", RopeTheta),
        BosTokenId = 0,
        EosTokenIds = [1],
        DeclaredDType = "float16",
    };

    /// <summary>Checks sizes fit together.</summary>
    /// <exception cref="ArgumentException">The first problem found.</exception>
    public void Validate()
    {
        static void Require(bool condition, string message)
        {
            if (!condition)
            {
                throw new ArgumentException(message);
            }
        }
        Require(VocabSize >= 259, $"--vocab must be at least 259 (3 specials + 256 bytes), got {VocabSize}.");
        Require(Layers >= 1, "--layers must be positive.");
        Require(HiddenSize >= 1 && Heads >= 1 && KvHeads >= 1, "--hidden, --heads and --kv-heads must be positive.");
        Require(HiddenSize % Heads == 0, $"--hidden ({HiddenSize}) must be a multiple of --heads ({Heads}).");
        Require((HiddenSize / Heads) % 2 == 0, $"The head size (--hidden / --heads = {HiddenSize / Heads}) must be even for RoPE.");
        Require(Heads % KvHeads == 0, $"--heads ({Heads}) must be a multiple of --kv-heads ({KvHeads}).");
        Require(IntermediateSize >= 1, "--intermediate must be positive.");
        Require(SeqLen >= 2 && SeqLen <= Context, $"--seq-len must be between 2 and --context ({Context}), got {SeqLen}.");
        Require(Batch >= 1, "--batch must be positive.");
        Require(Steps > 0 || Epochs > 0, "Give --steps or a positive --epochs.");
        Require(PeakLearningRate > 0, "--lr must be positive.");
        Require(MinLearningRateRatio is >= 0 and <= 1, "--min-lr-ratio must be in [0, 1].");
        Require(WarmupSteps >= 0, "--warmup must not be negative.");
        Require(WeightDecay >= 0, "--weight-decay must not be negative.");
        Require(GradClip > 0, "--grad-clip must be positive.");
        Require(CopyFraction is >= 0 and <= 1, "--copy-fraction must be in [0, 1].");
    }
}

/// <summary>How one invocation runs a recipe: where, on what, how often it reports. Does not change the result.</summary>
public sealed record TrainingRunOptions
{
    /// <summary>The output folder (the exported model, <c>checkpoint/</c>, <c>train_log.jsonl</c>).</summary>
    public required string OutputDirectory { get; init; }

    /// <summary>Continue from <c>checkpoint/</c> in the output folder.</summary>
    public bool Resume { get; init; }

    /// <summary>A tokenizer.json to use instead of training one.</summary>
    public string? TokenizerPath { get; init; }

    /// <summary>Evaluate held-out loss every this many steps (0: 20 times per run).</summary>
    public int EvalEvery { get; init; }

    /// <summary>Write a checkpoint every this many steps (0: at every evaluation).</summary>
    public int CheckpointEvery { get; init; }

    /// <summary>Report progress every this many steps (each report synchronises with the device).</summary>
    public int LogEvery { get; init; } = 10;

    /// <summary>Most held-out tokens per evaluation (0: all of them).</summary>
    public int EvalTokens { get; init; }

    /// <summary>Export the weights with the best held-out loss (true) or the last step's (false).</summary>
    public bool ExportBest { get; init; } = true;

    /// <summary>Stop after this step (a checkpoint is written), as if interrupted; 0 = run to the end.</summary>
    public int StopAfter { get; init; }

    /// <summary>Turn on LibTorch's deterministic algorithms (and math-only attention on CUDA).</summary>
    public bool Deterministic { get; init; } = true;

    /// <summary>Let CUDA matmuls use TF32 tensor cores.</summary>
    public bool AllowTf32 { get; init; } = true;

    /// <summary>The command line, for the manifest.</summary>
    public string? CommandLine { get; init; }
}

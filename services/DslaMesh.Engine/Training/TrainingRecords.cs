using System.Text.Json;
using System.Text.Json.Serialization;
using DslaMesh.Engine.Backends;

namespace DslaMesh.Engine.Training;

/// <summary>Progress of a running training job, reported every few steps.</summary>
/// <param name="Step">Steps done.</param>
/// <param name="TotalSteps">Steps the run will take.</param>
/// <param name="Loss">Mean training loss over the steps since the last report.</param>
/// <param name="GradNorm">Gradient norm (before clipping) of the last step.</param>
/// <param name="LearningRate">Learning rate of the last step.</param>
/// <param name="TokensPerSecond">Training tokens per second since the last report.</param>
/// <param name="TokensSeen">Training tokens consumed so far.</param>
/// <param name="Epoch">Passes over the training data so far.</param>
/// <param name="Elapsed">Training time so far, over all sessions of the run.</param>
/// <param name="Remaining">Estimated time to the last step.</param>
public sealed record TrainingProgress(int Step, int TotalSteps, double Loss, double GradNorm, double LearningRate, double TokensPerSecond, long TokensSeen, double Epoch, TimeSpan Elapsed, TimeSpan Remaining);

/// <summary>A held-out (or training-subset) evaluation.</summary>
/// <param name="Step">Step it was taken at.</param>
/// <param name="Loss">Mean next-token cross-entropy (nats).</param>
/// <param name="Tokens">Predicted tokens it averaged over.</param>
/// <param name="IsBest">Lowest held-out loss of the run so far.</param>
public sealed record EvaluationResult(int Step, double Loss, long Tokens, bool IsBest)
{
    /// <summary>e^loss.</summary>
    public double Perplexity => Math.Exp(Loss);
}

/// <summary>Receives a training run's progress (the CLI draws it; tests ignore it).</summary>
public interface ITrainingObserver
{
    /// <summary>A line of information (tokenizer trained, data sizes, resumed at step …).</summary>
    void OnMessage(string message) { }

    /// <summary>A progress report.</summary>
    void OnProgress(TrainingProgress progress) { }

    /// <summary>A held-out evaluation finished.</summary>
    void OnEvaluation(EvaluationResult evaluation) { }

    /// <summary>A checkpoint was written.</summary>
    void OnCheckpoint(int step, string directory) { }
}

/// <summary>What a finished (or stopped) run produced.</summary>
/// <param name="Completed">Reached the last step (false: stopped early, checkpoint written).</param>
/// <param name="Step">Steps done.</param>
/// <param name="OutputDirectory">The model folder (valid only when completed).</param>
/// <param name="Manifest">The manifest written with the model (null when not completed).</param>
/// <param name="FirstLoss">Training loss of the first reported interval of this session.</param>
/// <param name="LastLoss">Training loss of the last reported interval.</param>
public sealed record TrainingResult(bool Completed, int Step, string OutputDirectory, TrainingManifest? Manifest, double FirstLoss, double LastLoss);

/// <summary>The resumable state in <c>checkpoint/state.json</c> (weights and optimiser moments live beside it).</summary>
public sealed class CheckpointState
{
    [JsonPropertyName("format")] public int Format { get; set; } = 1;
    [JsonPropertyName("step")] public int Step { get; set; }
    [JsonPropertyName("total_steps")] public int TotalSteps { get; set; }
    [JsonPropertyName("tokens_seen")] public long TokensSeen { get; set; }
    [JsonPropertyName("elapsed_seconds")] public double ElapsedSeconds { get; set; }
    [JsonPropertyName("best_heldout_loss")] public double? BestHeldOutLoss { get; set; }
    [JsonPropertyName("best_step")] public int BestStep { get; set; }
    [JsonPropertyName("tokenizer_sha256")] public string TokenizerSha256 { get; set; } = "";
    [JsonPropertyName("train_tokens")] public int TrainTokens { get; set; }

    /// <summary>The sampler is a pure function of (seed, sample index); this records which, for humans.</summary>
    [JsonPropertyName("sampler")] public string Sampler { get; set; } = "";
    [JsonPropertyName("recipe")] public TrainingRecipe Recipe { get; set; } = new();
}

/// <summary><c>training_manifest.json</c>: how the shipped model was made and how good it is.</summary>
public sealed class TrainingManifest
{
    [JsonPropertyName("format")] public int Format { get; set; } = 1;
    [JsonPropertyName("created_by")] public string CreatedBy { get; set; } = "dslactl train";
    [JsonPropertyName("command")] public string? Command { get; set; }
    [JsonPropertyName("seed")] public long Seed { get; set; }
    [JsonPropertyName("recipe")] public TrainingRecipe Recipe { get; set; } = new();
    [JsonPropertyName("data")] public ManifestData Data { get; set; } = new();
    [JsonPropertyName("tokenizer")] public ManifestTokenizer Tokenizer { get; set; } = new();
    [JsonPropertyName("parameters")] public long Parameters { get; set; }
    [JsonPropertyName("steps")] public int Steps { get; set; }
    [JsonPropertyName("tokens_seen")] public long TokensSeen { get; set; }
    [JsonPropertyName("epochs_seen")] public double EpochsSeen { get; set; }
    [JsonPropertyName("exported_step")] public int ExportedStep { get; set; }
    [JsonPropertyName("exported_weights")] public string ExportedWeights { get; set; } = "";
    [JsonPropertyName("weights_dtype")] public string WeightsDType { get; set; } = "float16";
    [JsonPropertyName("weights_sha256")] public string WeightsSha256 { get; set; } = "";
    [JsonPropertyName("final")] public ManifestMetrics Final { get; set; } = new();
    [JsonPropertyName("evaluations")] public List<ManifestEvaluation> Evaluations { get; set; } = [];
    [JsonPropertyName("wall_seconds")] public double WallSeconds { get; set; }
    [JsonPropertyName("device")] public string Device { get; set; } = "";
    [JsonPropertyName("device_name")] public string? DeviceName { get; set; }
    [JsonPropertyName("cpu_threads")] public int CpuThreads { get; set; }
    [JsonPropertyName("torchsharp")] public string TorchSharp { get; set; } = "";
    [JsonPropertyName("determinism")] public DeterminismSettings? Determinism { get; set; }
    [JsonPropertyName("tf32")] public bool Tf32 { get; set; }
}

/// <summary>Data section of the manifest.</summary>
public sealed class ManifestData
{
    [JsonPropertyName("name")] public string Name { get; set; } = "";
    [JsonPropertyName("split")] public string Split { get; set; } = "";
    [JsonPropertyName("train_documents")] public int TrainDocuments { get; set; }
    [JsonPropertyName("heldout_documents")] public int HeldOutDocuments { get; set; }
    [JsonPropertyName("heldout_ids")] public IReadOnlyList<string> HeldOutIds { get; set; } = [];
    [JsonPropertyName("train_tokens")] public int TrainTokens { get; set; }
    [JsonPropertyName("heldout_tokens")] public int HeldOutTokens { get; set; }
    [JsonPropertyName("train_bytes")] public long TrainBytes { get; set; }
    [JsonPropertyName("heldout_bytes")] public long HeldOutBytes { get; set; }
}

/// <summary>Tokenizer section of the manifest.</summary>
public sealed class ManifestTokenizer
{
    [JsonPropertyName("kind")] public string Kind { get; set; } = "byte-level BPE (GPT-2 pre-tokenisation)";
    [JsonPropertyName("vocab_size")] public int VocabSize { get; set; }
    [JsonPropertyName("merges")] public int Merges { get; set; }
    [JsonPropertyName("trained_on")] public string TrainedOn { get; set; } = "";
    [JsonPropertyName("sha256")] public string Sha256 { get; set; } = "";
}

/// <summary>Final quality of the exported weights (as exported, so after rounding to fp16).</summary>
public sealed class ManifestMetrics
{
    [JsonPropertyName("train_loss")] public double TrainLoss { get; set; }
    [JsonPropertyName("train_perplexity")] public double TrainPerplexity { get; set; }
    [JsonPropertyName("train_eval_tokens")] public long TrainEvalTokens { get; set; }
    [JsonPropertyName("heldout_loss")] public double HeldOutLoss { get; set; }
    [JsonPropertyName("heldout_perplexity")] public double HeldOutPerplexity { get; set; }
    [JsonPropertyName("heldout_bits_per_byte")] public double HeldOutBitsPerByte { get; set; }
    [JsonPropertyName("heldout_eval_tokens")] public long HeldOutEvalTokens { get; set; }
}

/// <summary>One periodic held-out evaluation.</summary>
public sealed class ManifestEvaluation
{
    [JsonPropertyName("step")] public int Step { get; set; }
    [JsonPropertyName("heldout_loss")] public double HeldOutLoss { get; set; }
}

/// <summary>One line of <c>train_log.jsonl</c>.</summary>
public sealed class TrainLogLine
{
    [JsonPropertyName("step")] public int Step { get; set; }
    [JsonPropertyName("loss")] public double? Loss { get; set; }
    [JsonPropertyName("lr")] public double? LearningRate { get; set; }
    [JsonPropertyName("grad_norm")] public double? GradNorm { get; set; }
    [JsonPropertyName("tokens_per_second")] public double? TokensPerSecond { get; set; }
    [JsonPropertyName("heldout_loss")] public double? HeldOutLoss { get; set; }
    [JsonPropertyName("elapsed_seconds")] public double ElapsedSeconds { get; set; }
}

/// <summary>Serialisation of the training records with readable (unescaped) non-ASCII and markup characters.</summary>
internal static class TrainingJson
{
    private static readonly JsonSerializerOptions Readable = new(TrainingJsonContext.Default.Options)
    {
        Encoder = System.Text.Encodings.Web.JavaScriptEncoder.UnsafeRelaxedJsonEscaping,
    };

    private static readonly TrainingJsonContext Context = new(Readable);

    public static string Serialize(TrainingManifest manifest) => JsonSerializer.Serialize(manifest, Context.TrainingManifest);

    public static string Serialize(CheckpointState state) => JsonSerializer.Serialize(state, Context.CheckpointState);
}

/// <summary>Source-generated JSON for the training records.</summary>
[JsonSourceGenerationOptions(WriteIndented = true, DefaultIgnoreCondition = JsonIgnoreCondition.WhenWritingNull, PropertyNamingPolicy = JsonKnownNamingPolicy.SnakeCaseLower)]
[JsonSerializable(typeof(CheckpointState))]
[JsonSerializable(typeof(TrainingManifest))]
internal sealed partial class TrainingJsonContext : JsonSerializerContext;

/// <summary>Source-generated JSON for <c>train_log.jsonl</c> (one compact object per line).</summary>
[JsonSourceGenerationOptions(DefaultIgnoreCondition = JsonIgnoreCondition.WhenWritingNull)]
[JsonSerializable(typeof(TrainLogLine))]
[JsonSerializable(typeof(TrainingRecipe))]
internal sealed partial class TrainLogJsonContext : JsonSerializerContext;

using System.Text.Json;
using System.Text.Json.Serialization;
using DslaMesh.Engine.Backends;

namespace DslaMesh.Engine.Distillation;

/// <summary>Which part of the chained schedule a run is in.</summary>
public enum DistillationStage
{
    /// <summary>Layer-wise distillation, one layer at a time in sensitivity order.</summary>
    Layers,

    /// <summary>End-to-end logit KL over every converted layer.</summary>
    Kl,

    /// <summary>Finished; the weights and manifest are written.</summary>
    Done,
}

/// <summary>One converted layer's record: its losses before and after its own stage.</summary>
public sealed class LayerRecord
{
    /// <summary>Layer index.</summary>
    [JsonPropertyName("layer")] public int Layer { get; set; }

    /// <summary>Position in the conversion order (0-based).</summary>
    [JsonPropertyName("position")] public int Position { get; set; }

    /// <summary>Held-out distillation loss (normalised MSE) at initialisation from the teacher, in the hybrid it joins.</summary>
    [JsonPropertyName("initial_loss")] public double InitialLoss { get; set; }

    /// <summary>Held-out distillation loss after its stage.</summary>
    [JsonPropertyName("final_loss")] public double FinalLoss { get; set; }

    /// <summary>Mean training objective (loss + λ·gate cosine) over the last report interval of its stage.</summary>
    [JsonPropertyName("train_loss")] public double TrainLoss { get; set; }

    /// <summary>Mean gate cosine similarity on the held-out windows after its stage (dual-state variants; 0 otherwise).</summary>
    [JsonPropertyName("gate_cosine")] public double GateCosine { get; set; }

    /// <summary>γ, the history state's mixing weight, after its stage (dual-state variants).</summary>
    [JsonPropertyName("gamma")] public double? Gamma { get; set; }

    /// <summary>Held-out distillation loss after the KL stage, measured in the final hybrid (null before it ran).</summary>
    [JsonPropertyName("after_kl_loss")] public double? AfterKlLoss { get; set; }

    /// <summary>Optimiser steps.</summary>
    [JsonPropertyName("steps")] public int Steps { get; set; }

    /// <summary>Wall time of its stage, evaluation included.</summary>
    [JsonPropertyName("seconds")] public double Seconds { get; set; }
}

/// <summary>The end-to-end stage's record.</summary>
public sealed class KlRecord
{
    /// <summary>Optimiser steps.</summary>
    [JsonPropertyName("steps")] public int Steps { get; set; }

    /// <summary>Held-out KL(teacher ‖ hybrid) per token (nats) before the stage.</summary>
    [JsonPropertyName("initial_kl")] public double InitialKl { get; set; }

    /// <summary>Held-out KL(teacher ‖ hybrid) per token after the stage.</summary>
    [JsonPropertyName("final_kl")] public double FinalKl { get; set; }

    /// <summary>Mean training KL over the last report interval.</summary>
    [JsonPropertyName("train_kl")] public double TrainKl { get; set; }

    /// <summary>Wall time, evaluation included.</summary>
    [JsonPropertyName("seconds")] public double Seconds { get; set; }
}

/// <summary>
/// The resumable state of one variant's run, <c>dsla/checkpoint-&lt;variant&gt;/state.json</c>; the weights of every layer
/// added so far (<c>weights.safetensors</c>) and the current stage's AdamW moments (<c>optimizer.bin</c>) live beside it.
/// </summary>
public sealed class DistillationState
{
    [JsonPropertyName("format")] public int Format { get; set; } = 1;
    [JsonPropertyName("recipe")] public DistillationRecipe Recipe { get; set; } = new();

    /// <summary>The conversion order the chain follows (the whole order; the recipe may convert a prefix).</summary>
    [JsonPropertyName("order")] public List<int> Order { get; set; } = [];

    [JsonPropertyName("stage")] public DistillationStage Stage { get; set; }

    /// <summary>Position in the order of the layer being trained (layer stage).</summary>
    [JsonPropertyName("position")] public int Position { get; set; }

    /// <summary>Steps done in the current stage (0: the layer has not been added yet, or the KL stage has not started).</summary>
    [JsonPropertyName("stage_step")] public int StageStep { get; set; }

    /// <summary>Steps done in the whole run; training window i of the run is a pure function of (seed, i).</summary>
    [JsonPropertyName("step")] public int Step { get; set; }

    [JsonPropertyName("tokens_seen")] public long TokensSeen { get; set; }
    [JsonPropertyName("elapsed_seconds")] public double ElapsedSeconds { get; set; }

    /// <summary>Training stream length, checked on resume (same data).</summary>
    [JsonPropertyName("train_tokens")] public int TrainTokens { get; set; }

    /// <summary>SHA-256 of the teacher's model.safetensors (empty for sharded checkpoints), checked on resume.</summary>
    [JsonPropertyName("teacher_sha256")] public string TeacherSha256 { get; set; } = "";

    [JsonPropertyName("layers")] public List<LayerRecord> Layers { get; set; } = [];
    [JsonPropertyName("kl")] public KlRecord? Kl { get; set; }

    /// <summary>Initial held-out loss of the layer being trained, measured when it was added.</summary>
    [JsonPropertyName("current_initial_loss")] public double CurrentInitialLoss { get; set; }

    /// <summary>Held-out KL measured when the KL stage started.</summary>
    [JsonPropertyName("kl_initial")] public double KlInitial { get; set; }

    /// <summary>Wall time spent in the current stage so far.</summary>
    [JsonPropertyName("stage_seconds")] public double StageSeconds { get; set; }
}

/// <summary>What a finished (or stopped) distillation run produced.</summary>
/// <param name="Completed">Reached the end (false: stopped early, checkpoint written).</param>
/// <param name="Step">Steps done.</param>
/// <param name="TotalSteps">Steps of the whole run.</param>
/// <param name="WeightsPath">dsla/&lt;variant&gt;.safetensors (valid only when completed).</param>
/// <param name="State">The final state (layer and KL records).</param>
public sealed record DistillationResult(bool Completed, int Step, int TotalSteps, string WeightsPath, DistillationState State);

/// <summary>
/// The <c>distillation</c> object of a variant entry in <c>dsla/manifest.json</c> written by <c>dslactl distill</c> (the
/// entry itself carries file, layers, losses, tokens_seen, order, steps, wall_seconds and device).
/// </summary>
public sealed class DistillationSummary
{
    [JsonPropertyName("created_by")] public string CreatedBy { get; set; } = "dslactl distill";
    [JsonPropertyName("command")] public string? Command { get; set; }
    [JsonPropertyName("recipe")] public DistillationRecipe Recipe { get; set; } = new();

    /// <summary>What the per-layer losses measure.</summary>
    [JsonPropertyName("loss")] public string Loss { get; set; } = "";
    [JsonPropertyName("layer_records")] public List<LayerRecord> LayerRecords { get; set; } = [];
    [JsonPropertyName("kl")] public KlRecord? Kl { get; set; }
    [JsonPropertyName("device_name")] public string? DeviceName { get; set; }
    [JsonPropertyName("cpu_threads")] public int CpuThreads { get; set; }
    [JsonPropertyName("torchsharp")] public string TorchSharp { get; set; } = "";
    [JsonPropertyName("determinism")] public DeterminismSettings? Determinism { get; set; }
    [JsonPropertyName("tf32")] public bool Tf32 { get; set; }
    [JsonPropertyName("teacher_sha256")] public string TeacherSha256 { get; set; } = "";
    [JsonPropertyName("weights_sha256")] public string WeightsSha256 { get; set; } = "";
}

/// <summary>Serialisation of the distillation records.</summary>
public static class DistillationJson
{
    /// <summary>Options shared by the source-generated contexts (indented, readable non-ASCII, nulls omitted).</summary>
    private static readonly JsonSerializerOptions Readable = new(DistillationJsonContext.Default.Options)
    {
        Encoder = System.Text.Encodings.Web.JavaScriptEncoder.UnsafeRelaxedJsonEscaping,
    };

    private static readonly DistillationJsonContext Context = new(Readable);

    /// <summary>The type info of a record, for callers that serialise into a larger document.</summary>
    public static DistillationJsonContext Default => Context;

    public static string Serialize(DistillationState state) => JsonSerializer.Serialize(state, Context.DistillationState);

    public static DistillationState? DeserializeState(string json) => JsonSerializer.Deserialize(json, Context.DistillationState);

    public static string Serialize(SensitivityReport report) => JsonSerializer.Serialize(report, Context.SensitivityReport);

    public static string Serialize(EvaluationReport report) => JsonSerializer.Serialize(report, Context.EvaluationReport);

    public static EvaluationReport? DeserializeEvaluation(string json) => JsonSerializer.Deserialize(json, Context.EvaluationReport);
}

/// <summary>Source-generated JSON for the distillation and evaluation records.</summary>
[JsonSourceGenerationOptions(WriteIndented = true, DefaultIgnoreCondition = JsonIgnoreCondition.WhenWritingNull, UseStringEnumConverter = true)]
[JsonSerializable(typeof(DistillationState))]
[JsonSerializable(typeof(SensitivityReport))]
[JsonSerializable(typeof(EvaluationReport))]
public sealed partial class DistillationJsonContext : JsonSerializerContext;

/// <summary><c>dslactl sensitivity --output json</c>.</summary>
public sealed class SensitivityReport
{
    [JsonPropertyName("model")] public string Model { get; set; } = "";
    [JsonPropertyName("samples")] public int Samples { get; set; }
    [JsonPropertyName("seq_len")] public int SeqLen { get; set; }

    /// <summary>Entropy (nats) by layer index.</summary>
    [JsonPropertyName("entropy")] public List<double> Entropy { get; set; } = [];

    /// <summary>Conversion order, lowest entropy first.</summary>
    [JsonPropertyName("order")] public List<int> Order { get; set; } = [];

    /// <summary>Whether the manifest was updated.</summary>
    [JsonPropertyName("written")] public bool Written { get; set; }
}

using System.ComponentModel.DataAnnotations;

namespace DslaMesh.Engine.Serving;

/// <summary>Limits and behaviour of the continuous-batching engine.</summary>
public sealed class ServingEngineOptions
{
    /// <summary>Most sequences decoding at once.</summary>
    /// <remarks>Default value is 32.</remarks>
    [Range(1, 1024)]
    public int MaxBatchSize { get; set; } = 32;

    /// <summary>
    /// On CUDA, capture the decode graphs of every batch size up to <see cref="MaxBatchSize"/> when the engine starts
    /// (sizes 1–64 took 1.6–2.1 s in all for a 7B model on an H200) instead of at each size's first decode step.
    /// </summary>
    public bool PrepareDecodeGraphs { get; set; } = true;

    /// <summary>Most requests waiting for admission; beyond it submissions fail with <see cref="QueueFullException"/>.</summary>
    /// <remarks>Default value is 64.</remarks>
    [Range(0, 100_000)]
    public int MaxQueuedRequests { get; set; } = 64;

    /// <summary>Prompt tokens per prefill pass; long prompts are split so running streams keep decoding.</summary>
    /// <remarks>Default value is 256.</remarks>
    [Range(1, 65536)]
    public int PrefillChunkTokens { get; set; } = 256;

    /// <summary>KV-cache memory the engine may hold across all sequences, in bytes; 0 = unlimited.</summary>
    [Range(0, long.MaxValue)]
    public long KvBudgetBytes { get; set; }

    /// <summary>
    /// The largest fraction of layers the policy lets this service run as DSLA. Bounds <c>fast</c> requests and
    /// conversions the engine makes on its own under KV pressure.
    /// </summary>
    /// <remarks>Default value is 0.5 (the paper's cap for ≥ 8k prompts).</remarks>
    [Range(0.0, 1.0)]
    public double MaxDslaFraction { get; set; } = 0.5;

    /// <summary>Convert the next layer (within <see cref="MaxDslaFraction"/>) when a waiting request does not fit the KV budget.</summary>
    /// <remarks>Default value is true: convert before rejecting or preempting.</remarks>
    public bool ConvertUnderPressure { get; set; } = true;

    /// <summary>What a rejected client is told to wait.</summary>
    public TimeSpan RetryAfter { get; set; } = TimeSpan.FromSeconds(1);
}

namespace DslaMesh.Engine.Serving;

/// <summary>A request to change layer kinds, fenced by an epoch.</summary>
internal sealed class ConversionCommand
{
    public ConversionCommand(long epoch, IReadOnlyDictionary<int, bool> dslaByLayer)
    {
        Epoch = epoch;
        DslaByLayer = dslaByLayer;
    }

    public long Epoch { get; }
    public IReadOnlyDictionary<int, bool> DslaByLayer { get; }
    public TaskCompletionSource<ConversionResult> Completion { get; } = new(TaskCreationOptions.RunContinuationsAsynchronously);
}

/// <summary>What a conversion command did.</summary>
/// <param name="Accepted">False when rejected (stale epoch, unknown layer, no DSLA weights).</param>
/// <param name="Reason">Why it was rejected.</param>
/// <param name="Epoch">The epoch now applied.</param>
/// <param name="DslaLayers">Layers that run as DSLA for new requests afterwards.</param>
/// <param name="StallSeconds">Time the engine spent applying it (folding KV caches included).</param>
public sealed record ConversionResult(bool Accepted, string? Reason, long Epoch, IReadOnlyList<int> DslaLayers, double StallSeconds);

/// <summary>A point-in-time view of the engine for metrics, health and routing.</summary>
public sealed record EngineSnapshot(
    long Epoch,
    IReadOnlyList<int> DslaLayers,
    int LayerCount,
    int Waiting,
    int Running,
    long KvBytesUsed,
    long KvBudgetBytes,
    IReadOnlyList<int> PromptLengths,
    bool Draining);

/// <summary>Receives the engine's measurements (the service feeds them to Prometheus). Called on the engine thread.</summary>
public interface IServingObserver
{
    void OnFirstToken(double secondsSinceSubmit);
    void OnInterTokenLatency(double seconds);
    void OnRequestFinished(double seconds, Inference.FinishReason reason, GenerationUsage usage, long kvBytesSaved);
    void OnLayerChanged(int layer, bool toDsla);
    void OnConversionApplied(double stallSeconds);
}

/// <summary>An observer that ignores everything.</summary>
public sealed class NullServingObserver : IServingObserver
{
    public static NullServingObserver Instance { get; } = new();
    public void OnFirstToken(double secondsSinceSubmit) { }
    public void OnInterTokenLatency(double seconds) { }
    public void OnRequestFinished(double seconds, Inference.FinishReason reason, GenerationUsage usage, long kvBytesSaved) { }
    public void OnLayerChanged(int layer, bool toDsla) { }
    public void OnConversionApplied(double stallSeconds) { }
}

/// <summary>What the engine prepared before serving: decode graphs for this many batch sizes, in this long.</summary>
public sealed record EngineReadiness(int DecodeGraphBatchSizes, TimeSpan Elapsed);

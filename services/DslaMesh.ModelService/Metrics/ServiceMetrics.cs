using DslaMesh.Engine.Inference;
using DslaMesh.Engine.Serving;
using Prometheus;

namespace DslaMesh.ModelService.Metrics;

/// <summary>
/// Prometheus metrics with vLLM's names (so vLLM dashboards and autoscalers work unchanged) plus <c>dsla_*</c>
/// metrics, fed by the engine; also keeps latency windows for the metrics published to Redis.
/// </summary>
public sealed class ServiceMetrics : IServingObserver
{
    private static readonly double[] LatencyBuckets = [0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40, 80];
    private readonly Histogram _ttft;
    private readonly Histogram _itl;
    private readonly Histogram _e2e;
    private readonly Histogram _stall;
    private readonly Gauge _running;
    private readonly Gauge _waiting;
    private readonly Gauge _kvUsage;
    private readonly Gauge _layersConverted;
    private readonly Counter _conversions;
    private readonly Counter _kvSaved;
    private readonly Counter _promptTokens;
    private readonly Counter _generationTokens;
    private readonly Counter _requests;

    public ServiceMetrics()
    {
        Registry = Prometheus.Metrics.NewCustomRegistry();
        var factory = Prometheus.Metrics.WithCustomRegistry(Registry);
        _ttft = factory.CreateHistogram("time_to_first_token_seconds", "Time from request arrival to its first token.", new HistogramConfiguration { Buckets = LatencyBuckets });
        _itl = factory.CreateHistogram("inter_token_latency_seconds", "Time between consecutive tokens of a stream.", new HistogramConfiguration { Buckets = LatencyBuckets });
        _e2e = factory.CreateHistogram("e2e_request_latency_seconds", "Time from request arrival to its last token.", new HistogramConfiguration { Buckets = LatencyBuckets });
        _running = factory.CreateGauge("num_requests_running", "Requests decoding or prefilling.");
        _waiting = factory.CreateGauge("num_requests_waiting", "Requests waiting for admission.");
        _kvUsage = factory.CreateGauge("kv_cache_usage_perc", "KV-cache memory in use as a fraction of the budget (0 when unlimited).");
        _promptTokens = factory.CreateCounter("prompt_tokens_total", "Prompt tokens processed.");
        _generationTokens = factory.CreateCounter("generation_tokens_total", "Tokens generated.");
        _requests = factory.CreateCounter("request_success_total", "Finished requests by reason.", new CounterConfiguration { LabelNames = ["finished_reason"] });
        _layersConverted = factory.CreateGauge("dsla_layers_converted", "Layers new requests run as DSLA.");
        _conversions = factory.CreateCounter("dsla_conversions_total", "Layer conversions by direction.", new CounterConfiguration { LabelNames = ["direction"] });
        _stall = factory.CreateHistogram("dsla_swap_stall_seconds", "Engine pause to apply a conversion command (KV folding included).", new HistogramConfiguration { Buckets = LatencyBuckets });
        _kvSaved = factory.CreateCounter("dsla_kv_bytes_saved_total", "KV-cache bytes finished requests did not hold thanks to DSLA layers.");
        Registry.AddBeforeCollectCallback(Refresh);
    }

    /// <summary>This service's registry (one per host, so several hosts can share a test process).</summary>
    public CollectorRegistry Registry { get; }

    /// <summary>Recent time-to-first-token samples.</summary>
    public LatencyWindow TimeToFirstToken { get; } = new(1024);

    /// <summary>Recent inter-token latency samples.</summary>
    public LatencyWindow InterTokenLatency { get; } = new(4096);

    /// <summary>Where gauges read the engine state from at scrape time.</summary>
    public Func<EngineSnapshot?> SnapshotSource { get; set; } = () => null;

    /// <summary>Conversions applied, by direction.</summary>
    public long ConversionsToDsla { get; private set; }

    /// <summary>Reverts applied.</summary>
    public long ConversionsToAttention { get; private set; }

    /// <summary>Layers in the model (for percentages).</summary>
    public int LayerCount { get; private set; }

    public void SetLayerCount(int layers) => LayerCount = layers;

    /// <inheritdoc/>
    public void OnFirstToken(double secondsSinceSubmit)
    {
        _ttft.Observe(secondsSinceSubmit);
        TimeToFirstToken.Add(secondsSinceSubmit);
    }

    /// <inheritdoc/>
    public void OnInterTokenLatency(double seconds)
    {
        _itl.Observe(seconds);
        InterTokenLatency.Add(seconds);
    }

    /// <inheritdoc/>
    public void OnRequestFinished(double seconds, FinishReason reason, GenerationUsage usage, long kvBytesSaved)
    {
        _e2e.Observe(seconds);
        _promptTokens.Inc(usage.PromptTokens);
        _generationTokens.Inc(usage.CompletionTokens);
        _requests.WithLabels(reason.ToString().ToLowerInvariant()).Inc();
        if (kvBytesSaved > 0)
        {
            _kvSaved.Inc(kvBytesSaved);
        }
    }

    /// <inheritdoc/>
    public void OnLayerChanged(int layer, bool toDsla)
    {
        _conversions.WithLabels(toDsla ? "to_dsla" : "to_attention").Inc();
        if (toDsla)
        {
            ConversionsToDsla++;
        }
        else
        {
            ConversionsToAttention++;
        }
    }

    /// <inheritdoc/>
    public void OnConversionApplied(double stallSeconds) => _stall.Observe(stallSeconds);

    private void Refresh()
    {
        if (SnapshotSource() is not { } snapshot)
        {
            return;
        }
        _running.Set(snapshot.Running);
        _waiting.Set(snapshot.Waiting);
        _kvUsage.Set(snapshot.KvBudgetBytes > 0 ? (double)snapshot.KvBytesUsed / snapshot.KvBudgetBytes : 0);
        _layersConverted.Set(snapshot.DslaLayers.Count);
    }
}

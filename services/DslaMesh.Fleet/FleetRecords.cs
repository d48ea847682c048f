using System.Text.Json.Serialization;

namespace DslaMesh.Fleet;

/// <summary>What a model service registers in Redis (<c>{prefix}:service:{id}</c>, refreshed with a TTL).</summary>
public sealed record ServiceRegistration(
    [property: JsonPropertyName("id")] string Id,
    [property: JsonPropertyName("address")] string Address,
    [property: JsonPropertyName("grpc_address")] string GrpcAddress,
    [property: JsonPropertyName("model")] string Model,
    [property: JsonPropertyName("layer_count")] int LayerCount,
    [property: JsonPropertyName("sensitivity_order")] IReadOnlyList<int> SensitivityOrder,
    [property: JsonPropertyName("variant")] string Variant,
    [property: JsonPropertyName("context_length")] int ContextLength,
    [property: JsonPropertyName("max_batch_size")] int MaxBatchSize,
    [property: JsonPropertyName("max_queued_requests")] int MaxQueuedRequests,
    [property: JsonPropertyName("kv_budget_bytes")] long KvBudgetBytes,
    [property: JsonPropertyName("started_at")] DateTimeOffset StartedAt);

/// <summary>What a model service publishes every period (<c>{prefix}:metrics:{id}</c> and the metrics channel).</summary>
public sealed record ServiceMetricsRecord(
    [property: JsonPropertyName("id")] string Id,
    [property: JsonPropertyName("timestamp")] DateTimeOffset Timestamp,
    [property: JsonPropertyName("queue_depth")] int QueueDepth,
    [property: JsonPropertyName("running")] int Running,
    [property: JsonPropertyName("prompt_length_histogram")] IReadOnlyDictionary<string, int> PromptLengthHistogram,
    [property: JsonPropertyName("max_prompt_tokens")] int MaxPromptTokens,
    [property: JsonPropertyName("kv_used_bytes")] long KvUsedBytes,
    [property: JsonPropertyName("kv_total_bytes")] long KvTotalBytes,
    [property: JsonPropertyName("ttft_p50")] double TtftP50,
    [property: JsonPropertyName("ttft_p99")] double TtftP99,
    [property: JsonPropertyName("itl_p50")] double ItlP50,
    [property: JsonPropertyName("itl_p99")] double ItlP99,
    [property: JsonPropertyName("dsla_layers")] IReadOnlyList<int> DslaLayers,
    [property: JsonPropertyName("layer_count")] int LayerCount,
    [property: JsonPropertyName("epoch")] long Epoch,
    [property: JsonPropertyName("draining")] bool Draining);

/// <summary>Source-generated JSON for the fleet records.</summary>
[JsonSerializable(typeof(ServiceRegistration))]
[JsonSerializable(typeof(ServiceMetricsRecord))]
public sealed partial class FleetJsonContext : JsonSerializerContext;

/// <summary>Redis key layout shared by the fleet.</summary>
public static class FleetKeys
{
    public static string Service(string prefix, string id) => $"{prefix}:service:{id}";
    public static string Services(string prefix) => $"{prefix}:services";
    public static string Metrics(string prefix, string id) => $"{prefix}:metrics:{id}";
    public static string MetricsChannel(string prefix) => $"{prefix}:metrics";

    /// <summary>Prompt-length buckets, as the paper's conversion-rate table splits them.</summary>
    public static string PromptBucket(int tokens) => tokens switch
    {
        < 2048 => "lt2k",
        < 4096 => "2k-4k",
        < 8192 => "4k-8k",
        _ => "ge8k",
    };
}

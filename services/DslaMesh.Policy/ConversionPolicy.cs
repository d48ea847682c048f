using System.Text.Json.Serialization;

namespace DslaMesh.Policy;

/// <summary>
/// The controller's layer-conversion policy (stored as JSON in <c>{prefix}:policy:current</c>). Every property has a
/// default, so a policy file only needs what it changes; the stored form is always the full, normalised policy.
/// </summary>
public sealed record ConversionPolicy
{
    /// <summary>Assigned by the controller when the policy is set (ignored on input); 0 is the built-in default.</summary>
    [JsonPropertyName("version")]
    public long Version { get; set; }

    /// <summary>Free text for operators.</summary>
    [JsonPropertyName("description")]
    public string? Description { get; set; }

    /// <summary>
    /// The maximum conversion rate (MCR) by prompt length: the bucket with the largest <c>min_prompt_tokens</c> not
    /// above the service's longest current prompt gives the largest fraction of layers that may run as DSLA.
    /// </summary>
    /// <remarks>Default: the paper's table, 12.5% under 2k tokens, 25% for 2–4k, 37.5% for 4–8k, 50% from 8k.</remarks>
    [JsonPropertyName("max_conversion_rate")]
    public IReadOnlyList<ConversionRateBucket> MaxConversionRate { get; set; } = PaperRates;

    /// <summary>Load signals with high- and low-water marks.</summary>
    [JsonPropertyName("triggers")]
    public PolicyTriggers Triggers { get; set; } = new();

    /// <summary>Layers converted or reverted per step.</summary>
    /// <remarks>Default value is 1.</remarks>
    [JsonPropertyName("step_layers")]
    public int StepLayers { get; set; } = 1;

    /// <summary>Least time between two steps on one service, in milliseconds.</summary>
    /// <remarks>Default value is 2000.</remarks>
    [JsonPropertyName("cooldown_ms")]
    public int CooldownMs { get; set; } = 2000;

    /// <summary>
    /// How long the longest prompt seen keeps counting after it left the service, in milliseconds (so the MCR bucket
    /// does not flap between requests).
    /// </summary>
    /// <remarks>Default value is 2000.</remarks>
    [JsonPropertyName("prompt_window_ms")]
    public int PromptWindowMs { get; set; } = 2000;

    /// <summary>Metrics older than this (milliseconds) are not acted on: the service's layers are held.</summary>
    /// <remarks>Default value is 5000.</remarks>
    [JsonPropertyName("metrics_max_age_ms")]
    public int MetricsMaxAgeMs { get; set; } = 5000;

    /// <summary>Global cap: the largest fraction of any one service's layers that may be DSLA, whatever the MCR says.</summary>
    /// <remarks>Default value is 0.5 (the paper's highest rate).</remarks>
    [JsonPropertyName("global_max_dsla_fraction")]
    public double GlobalMaxDslaFraction { get; set; } = 0.5;

    /// <summary>Fleet cap: the largest fraction of all layers of all services that may be DSLA at once.</summary>
    /// <remarks>Default value is 1 (no fleet-wide limit beyond the per-service caps).</remarks>
    [JsonPropertyName("fleet_max_dsla_fraction")]
    public double FleetMaxDslaFraction { get; set; } = 1.0;

    /// <summary>Per-service overrides, keyed by service id.</summary>
    [JsonPropertyName("overrides")]
    public IReadOnlyDictionary<string, ServiceOverride> Overrides { get; set; } = new Dictionary<string, ServiceOverride>();

    /// <summary>The paper's maximum conversion rates.</summary>
    public static IReadOnlyList<ConversionRateBucket> PaperRates { get; } =
    [
        new(0, 0.125),
        new(2048, 0.25),
        new(4096, 0.375),
        new(8192, 0.5),
    ];

    /// <summary>The built-in policy (version 0) used until one is set.</summary>
    public static ConversionPolicy Default { get; } = new() { Description = "built-in default: the paper's MCR table" };
}

/// <summary>One row of the maximum-conversion-rate table.</summary>
/// <param name="MinPromptTokens">Prompts at least this long (tokens) fall in this bucket.</param>
/// <param name="MaxDslaFraction">Largest fraction of layers that may be DSLA, 0..1.</param>
public sealed record ConversionRateBucket(
    [property: JsonPropertyName("min_prompt_tokens")] int MinPromptTokens,
    [property: JsonPropertyName("max_dsla_fraction")] double MaxDslaFraction);

/// <summary>
/// Load signals. Pressure is high when any configured signal reaches its <c>high</c> mark and calm when every configured
/// signal is at or below its <c>low</c> mark; in between the layers are held (hysteresis). Set a signal to null to ignore it.
/// </summary>
public sealed record PolicyTriggers
{
    /// <summary>Requests waiting for a batch slot.</summary>
    /// <remarks>Default: high 4, low 0.</remarks>
    [JsonPropertyName("queue_depth")]
    public Watermarks? QueueDepth { get; set; } = new(4, 0);

    /// <summary>KV-cache memory in use as a fraction of the service's KV budget (0..1).</summary>
    /// <remarks>Default: high 0.8, low 0.5.</remarks>
    [JsonPropertyName("kv_usage")]
    public Watermarks? KvUsage { get; set; } = new(0.8, 0.5);

    /// <summary>The longest prompt in the service's current mix (tokens), held for <c>prompt_window_ms</c>.</summary>
    /// <remarks>Default: off.</remarks>
    [JsonPropertyName("prompt_tokens")]
    public Watermarks? PromptTokens { get; set; }
}

/// <summary>
/// A high- and a low-water mark; <c>low</c> must not be above <c>high</c>. Equal marks leave no hysteresis band (a signal
/// at the mark counts as high), so <c>{"high": 0, "low": 0}</c> converts up to the cap whatever the load.
/// </summary>
public sealed record Watermarks(
    [property: JsonPropertyName("high")] double High,
    [property: JsonPropertyName("low")] double Low);

/// <summary>What one service does differently from the fleet policy.</summary>
public sealed record ServiceOverride
{
    /// <summary>Never convert this service (and revert what is converted).</summary>
    [JsonPropertyName("disabled")]
    public bool Disabled { get; set; }

    /// <summary>A lower (or higher, up to 1) cap for this service than <c>global_max_dsla_fraction</c>.</summary>
    [JsonPropertyName("max_dsla_fraction")]
    public double? MaxDslaFraction { get; set; }

    /// <summary>Replaces the fleet's triggers for this service.</summary>
    [JsonPropertyName("triggers")]
    public PolicyTriggers? Triggers { get; set; }

    /// <summary>Replaces the fleet's cooldown for this service.</summary>
    [JsonPropertyName("cooldown_ms")]
    public int? CooldownMs { get; set; }

    /// <summary>Replaces the fleet's step size for this service.</summary>
    [JsonPropertyName("step_layers")]
    public int? StepLayers { get; set; }
}

/// <summary>One entry of <c>{prefix}:policy:history</c>.</summary>
public sealed record PolicyHistoryEntry(
    [property: JsonPropertyName("version")] long Version,
    [property: JsonPropertyName("set_at")] DateTimeOffset SetAt,
    [property: JsonPropertyName("set_by")] string SetBy,
    [property: JsonPropertyName("comment")] string Comment,
    [property: JsonPropertyName("policy")] ConversionPolicy Policy);

/// <summary>Source-generated JSON for policies (unknown properties are errors, so typos do not pass silently).</summary>
[JsonSourceGenerationOptions(
    UnmappedMemberHandling = JsonUnmappedMemberHandling.Disallow,
    RespectNullableAnnotations = true,
    ReadCommentHandling = System.Text.Json.JsonCommentHandling.Skip,
    AllowTrailingCommas = true,
    WriteIndented = true)]
[JsonSerializable(typeof(ConversionPolicy))]
[JsonSerializable(typeof(PolicyHistoryEntry))]
[JsonSerializable(typeof(ServiceDecisionState))]
[JsonSerializable(typeof(List<DryRunDecision>))]
public sealed partial class PolicyJsonContext : JsonSerializerContext;

using System.ComponentModel.DataAnnotations;
using Microsoft.Extensions.Options;

namespace DslaMesh.Gateway.Hosting;

/// <summary>Configuration of the gateway (section <c>Gateway</c>).</summary>
public sealed class GatewayOptions : IValidatableObject
{
    /// <summary>Configuration section name.</summary>
    public const string SectionName = "Gateway";

    /// <summary>Whether the proxied routes need an API key (<c>Authorization: Bearer</c> or <c>x-api-key</c>).</summary>
    /// <remarks>Default value is <see langword="true"/>; turning it off makes every caller one anonymous tenant.</remarks>
    public bool RequireApiKey { get; set; } = true;

    /// <summary>The accepted keys; each names a tenant, which is also its rate-limit partition.</summary>
    [ValidateEnumeratedItems]
    public List<ApiKeyOptions> ApiKeys { get; set; } = [];

    /// <summary>Per-key limits for keys that set none of their own.</summary>
    [ValidateObjectMembers]
    public RateLimitOptions RateLimit { get; set; } = new();

    /// <summary>Largest accepted request body, in bytes (413 above it).</summary>
    /// <remarks>Default value is 4 MiB.</remarks>
    [Range(1024, 256L << 20)]
    public long MaxRequestBodyBytes { get; set; } = 4 << 20;

    /// <summary>How long a proxied stream may stay silent before the gateway gives up on it.</summary>
    /// <remarks>Default value is 10 minutes: a long prefill on a busy replica can delay the first token for minutes.</remarks>
    [Range(typeof(TimeSpan), "00:00:01", "1.00:00:00")]
    public TimeSpan StreamActivityTimeout { get; set; } = TimeSpan.FromMinutes(10);

    /// <summary>TCP connect timeout to a replica; a refused or timed-out connect is retried on another replica.</summary>
    /// <remarks>Default value is 2 seconds.</remarks>
    [Range(typeof(TimeSpan), "00:00:00.050", "00:01:00")]
    public TimeSpan ConnectTimeout { get; set; } = TimeSpan.FromSeconds(2);

    /// <summary>
    /// Replicas tried per request when a replica cannot take it (connect failed, draining 503/UNAVAILABLE, queue full
    /// 429/RESOURCE_EXHAUSTED). Nothing is retried once a replica has started answering.
    /// </summary>
    /// <remarks>Default value is 3.</remarks>
    [Range(1, 8)]
    public int MaxAttempts { get; set; } = 3;

    /// <summary>Active and passive health checking.</summary>
    [ValidateObjectMembers]
    public GatewayHealthOptions Health { get; set; } = new();

    /// <summary>The metrics-aware load-balancing policy.</summary>
    [ValidateObjectMembers]
    public RoutingOptions Routing { get; set; } = new();

    /// <inheritdoc/>
    public IEnumerable<ValidationResult> Validate(ValidationContext validationContext)
    {
        if (RequireApiKey && ApiKeys.Count == 0)
        {
            yield return new ValidationResult("RequireApiKey is on but no ApiKeys are configured (set Gateway:ApiKeys:0:Name and Gateway:ApiKeys:0:Key).", [nameof(ApiKeys)]);
        }
        foreach (var duplicate in ApiKeys.GroupBy(k => k.Key, StringComparer.Ordinal).Where(g => g.Count() > 1))
        {
            yield return new ValidationResult($"API key of '{duplicate.First().Name}' is configured {duplicate.Count()} times.", [nameof(ApiKeys)]);
        }
    }
}

/// <summary>One accepted API key.</summary>
public sealed class ApiKeyOptions
{
    /// <summary>The tenant the key belongs to (logged, and its rate-limit partition).</summary>
    [Required]
    [RegularExpression("^[A-Za-z0-9_.-]{1,64}$")]
    public string Name { get; set; } = "";

    /// <summary>The secret; at least 16 characters.</summary>
    [Required]
    [MinLength(16)]
    public string Key { get; set; } = "";

    /// <summary>Overrides <see cref="RateLimitOptions.RequestsPerSecond"/> for this key.</summary>
    [Range(0.001, 1_000_000)]
    public double? RequestsPerSecond { get; set; }

    /// <summary>Overrides <see cref="RateLimitOptions.Burst"/> for this key.</summary>
    [Range(1, 1_000_000)]
    public int? Burst { get; set; }

    /// <summary>Overrides <see cref="RateLimitOptions.MaxConcurrentRequests"/> for this key.</summary>
    [Range(0, 1_000_000)]
    public int? MaxConcurrentRequests { get; set; }
}

/// <summary>Per-key limits: a token bucket on request starts and a cap on concurrent streams.</summary>
public sealed class RateLimitOptions
{
    /// <summary>Sustained requests per second per key; 0 turns the request-rate limit off.</summary>
    /// <remarks>Default value is 20.</remarks>
    [Range(0, 1_000_000)]
    public double RequestsPerSecond { get; set; } = 20;

    /// <summary>Requests a key may send at once above the sustained rate (the bucket size).</summary>
    /// <remarks>Default value is 40.</remarks>
    [Range(1, 1_000_000)]
    public int Burst { get; set; } = 40;

    /// <summary>Streams one key may have open at once; 0 = unlimited.</summary>
    /// <remarks>Default value is 64.</remarks>
    [Range(0, 1_000_000)]
    public int MaxConcurrentRequests { get; set; } = 64;
}

/// <summary>Active probes of <c>/health</c> and passive marking on transport failures.</summary>
public sealed class GatewayHealthOptions
{
    /// <summary>How often each replica's <c>/health</c> is probed.</summary>
    /// <remarks>Default value is 2 seconds.</remarks>
    [Range(typeof(TimeSpan), "00:00:00.050", "00:10:00")]
    public TimeSpan ActiveInterval { get; set; } = TimeSpan.FromSeconds(2);

    /// <summary>Probe timeout.</summary>
    /// <remarks>Default value is 5 seconds.</remarks>
    [Range(typeof(TimeSpan), "00:00:00.050", "00:10:00")]
    public TimeSpan ActiveTimeout { get; set; } = TimeSpan.FromSeconds(5);

    /// <summary>Consecutive failed probes that mark a replica unhealthy.</summary>
    /// <remarks>Default value is 2.</remarks>
    [Range(1, 100)]
    public int ActiveFailureThreshold { get; set; } = 2;

    /// <summary>How long a replica stays out of rotation after a transport failure before it is tried again.</summary>
    /// <remarks>Default value is 5 seconds.</remarks>
    [Range(typeof(TimeSpan), "00:00:00.050", "01:00:00")]
    public TimeSpan ReactivationPeriod { get; set; } = TimeSpan.FromSeconds(5);
}

/// <summary>Weights of the metrics-aware policy (see docs/gateway.md for the score).</summary>
public sealed class RoutingOptions
{
    /// <summary>Metrics older than this make the policy fall back to power-of-two-choices.</summary>
    /// <remarks>Default value is 3 seconds (three publish periods).</remarks>
    [Range(typeof(TimeSpan), "00:00:00.050", "00:10:00")]
    public TimeSpan MetricsStaleAfter { get; set; } = TimeSpan.FromSeconds(3);

    /// <summary>Prompt length (tokens) at which a prompt counts as fully long; the paper's top bucket starts at 8k.</summary>
    /// <remarks>Default value is 8192.</remarks>
    [Range(1, 1 << 24)]
    public int LongPromptTokens { get; set; } = 8192;

    /// <summary>Bytes of prompt text per token when the gateway estimates a prompt's length.</summary>
    /// <remarks>Default value is 4 (English BPE).</remarks>
    [Range(0.5, 64)]
    public double BytesPerToken { get; set; } = 4;

    /// <summary>Weight of the replica's load (running + queued + sent since its last metrics, over its batch size).</summary>
    [Range(0, 1000)]
    public double LoadWeight { get; set; } = 1;

    /// <summary>Weight of the replica's KV-cache use, scaled up for long prompts.</summary>
    [Range(0, 1000)]
    public double KvWeight { get; set; } = 1;

    /// <summary>Weight of DSLA layers beyond what the request's fidelity allows (exact allows none).</summary>
    [Range(0, 1000)]
    public double FidelityWeight { get; set; } = 2;

    /// <summary>Weight that steers long prompts to replicas with more DSLA layers.</summary>
    [Range(0, 1000)]
    public double LongPromptDslaWeight { get; set; } = 1;
}

/// <summary>Validates <see cref="GatewayOptions"/> at start.</summary>
[OptionsValidator]
public sealed partial class GatewayOptionsValidator : IValidateOptions<GatewayOptions>;

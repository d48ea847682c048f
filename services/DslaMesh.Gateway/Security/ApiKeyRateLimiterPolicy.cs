using System.Threading.RateLimiting;
using DslaMesh.Gateway.Proxy;
using Microsoft.AspNetCore.RateLimiting;

namespace DslaMesh.Gateway.Security;

/// <summary>
/// One partition per tenant: a token bucket on request starts (sustained rate plus burst) chained with a cap on open
/// streams. Rejections answer 429 with <c>Retry-After</c> and an OpenAI error body, or gRPC RESOURCE_EXHAUSTED with a
/// <c>retry-after</c> header.
/// </summary>
public sealed partial class ApiKeyRateLimiterPolicy : IRateLimiterPolicy<string>
{
    private readonly ApiKeyStore _keys;
    private readonly ILogger<ApiKeyRateLimiterPolicy> _logger;

    public ApiKeyRateLimiterPolicy(ApiKeyStore keys, ILogger<ApiKeyRateLimiterPolicy> logger)
    {
        _keys = keys;
        _logger = logger;
        OnRejected = RejectAsync;
    }

    /// <inheritdoc/>
    public Func<OnRejectedContext, CancellationToken, ValueTask>? OnRejected { get; }

    /// <inheritdoc/>
    public RateLimitPartition<string> GetPartition(HttpContext httpContext)
    {
        ArgumentNullException.ThrowIfNull(httpContext);
        var tenant = _keys.ByName(httpContext.User.Identity?.IsAuthenticated == true ? httpContext.User.Identity.Name : null);
        return RateLimitPartition.Get(tenant.Name, _ => Create(tenant));
    }

    private static RateLimiter Create(ApiKeyTenant tenant)
    {
        var limiters = new List<RateLimiter>(2);
        if (tenant.RequestsPerSecond > 0)
        {
            // Replenish ten times a second when the rate allows, so a key is not made to wait a whole second.
            var (period, tokens) = tenant.RequestsPerSecond >= 10
                ? (TimeSpan.FromMilliseconds(100), (int)Math.Round(tenant.RequestsPerSecond / 10))
                : (TimeSpan.FromSeconds(1 / tenant.RequestsPerSecond), 1);
            limiters.Add(new TokenBucketRateLimiter(new TokenBucketRateLimiterOptions
            {
                TokenLimit = tenant.Burst,
                TokensPerPeriod = Math.Max(1, tokens),
                ReplenishmentPeriod = period,
                QueueLimit = 0,
                AutoReplenishment = true,
            }));
        }
        if (tenant.MaxConcurrentRequests > 0)
        {
            limiters.Add(new ConcurrencyLimiter(new ConcurrencyLimiterOptions { PermitLimit = tenant.MaxConcurrentRequests, QueueLimit = 0 }));
        }
        return limiters.Count switch
        {
            0 => new ConcurrencyLimiter(new ConcurrencyLimiterOptions { PermitLimit = int.MaxValue, QueueLimit = 0 }),
            1 => limiters[0],
            _ => RateLimiter.CreateChained([.. limiters]),
        };
    }

    private async ValueTask RejectAsync(OnRejectedContext context, CancellationToken cancellationToken)
    {
        var http = context.HttpContext;
        var tenant = http.User.Identity?.Name ?? ApiKeyDefaults.Anonymous;
        var retryAfter = context.Lease.TryGetMetadata(MetadataName.RetryAfter, out var wait) ? wait : TimeSpan.FromSeconds(1);
        Log.RateLimited(_logger, tenant, retryAfter.TotalSeconds);
        await GatewayResponses.WriteAsync(http, GatewayError.RateLimited,
            $"Rate limit reached for '{tenant}': too many requests or open streams. Retry after {Math.Max(1, Math.Ceiling(retryAfter.TotalSeconds))} s.", retryAfter).ConfigureAwait(false);
    }

    private static partial class Log
    {
        [LoggerMessage(301, LogLevel.Information, "Rate limited tenant {Tenant}; retry after {Seconds:F1} s", EventName = "RateLimited")]
        public static partial void RateLimited(ILogger logger, string tenant, double seconds);
    }
}

using System.Collections.Frozen;
using System.Security.Claims;
using System.Security.Cryptography;
using System.Text;
using DslaMesh.Gateway.Hosting;
using Microsoft.Extensions.Options;

namespace DslaMesh.Gateway.Security;

/// <summary>Names shared by the authentication scheme, the authorization policy and the rate limiter.</summary>
public static class ApiKeyDefaults
{
    /// <summary>The authentication scheme.</summary>
    public const string Scheme = "ApiKey";

    /// <summary>The authorization policy the proxied routes require.</summary>
    public const string PolicyName = "ApiKey";

    /// <summary>The rate-limiter policy of the proxied routes.</summary>
    public const string RateLimiterPolicyName = "PerApiKey";

    /// <summary>The tenant of requests without a key when keys are not required.</summary>
    public const string Anonymous = "anonymous";
}

/// <summary>A tenant: its name, its principal and its limits.</summary>
public sealed record ApiKeyTenant(string Name, ClaimsPrincipal Principal, double RequestsPerSecond, int Burst, int MaxConcurrentRequests);

/// <summary>
/// The configured keys, looked up by SHA-256 so that the lookup's timing says nothing about a key's characters.
/// Keys never appear in logs; tenants do.
/// </summary>
public sealed class ApiKeyStore
{
    private readonly FrozenDictionary<string, ApiKeyTenant> _byHash;
    private readonly FrozenDictionary<string, ApiKeyTenant> _byName;

    public ApiKeyStore(IOptions<GatewayOptions> options)
    {
        ArgumentNullException.ThrowIfNull(options);
        var gateway = options.Value;
        var limits = gateway.RateLimit;
        var tenants = gateway.ApiKeys.Select(k => (Hash: Hash(k.Key), Tenant: new ApiKeyTenant(k.Name, Principal(k.Name),
            k.RequestsPerSecond ?? limits.RequestsPerSecond, k.Burst ?? limits.Burst, k.MaxConcurrentRequests ?? limits.MaxConcurrentRequests))).ToList();
        _byHash = tenants.ToFrozenDictionary(t => t.Hash, t => t.Tenant, StringComparer.Ordinal);
        Anonymous = new ApiKeyTenant(ApiKeyDefaults.Anonymous, new ClaimsPrincipal(new ClaimsIdentity()), limits.RequestsPerSecond, limits.Burst, limits.MaxConcurrentRequests);
        // Several keys may share a tenant name (key rotation); they share its limits too.
        _byName = tenants.GroupBy(t => t.Tenant.Name, StringComparer.Ordinal).ToFrozenDictionary(g => g.Key, g => g.First().Tenant, StringComparer.Ordinal);
    }

    /// <summary>The tenant of unauthenticated requests (only reachable when keys are not required).</summary>
    public ApiKeyTenant Anonymous { get; }

    /// <summary>The tenant a presented key belongs to.</summary>
    public bool TryGet(ReadOnlySpan<char> key, out ApiKeyTenant tenant) => _byHash.TryGetValue(Hash(key), out tenant!);

    /// <summary>A tenant by name (the authenticated principal's name), or the anonymous tenant.</summary>
    public ApiKeyTenant ByName(string? name) => name is not null && _byName.TryGetValue(name, out var tenant) ? tenant : Anonymous;

    /// <summary>The key a request presents: <c>Authorization: Bearer KEY</c> or <c>x-api-key: KEY</c>.</summary>
    public static ReadOnlySpan<char> Presented(HttpRequest request)
    {
        ArgumentNullException.ThrowIfNull(request);
        if (request.Headers.Authorization is { Count: > 0 } authorization && authorization[0] is { } value
            && value.StartsWith("Bearer ", StringComparison.OrdinalIgnoreCase))
        {
            return value.AsSpan(7).Trim();
        }
        return request.Headers["x-api-key"] is { Count: > 0 } header && header[0] is { } key ? key.AsSpan().Trim() : [];
    }

    private static ClaimsPrincipal Principal(string name) =>
        new(new ClaimsIdentity([new Claim(ClaimTypes.Name, name)], ApiKeyDefaults.Scheme));

    private static string Hash(ReadOnlySpan<char> key)
    {
        Span<byte> utf8 = stackalloc byte[Encoding.UTF8.GetMaxByteCount(Math.Min(key.Length, 256))];
        var written = Encoding.UTF8.GetBytes(key.Length > 256 ? key[..256] : key, utf8);
        Span<byte> hash = stackalloc byte[SHA256.HashSizeInBytes];
        SHA256.HashData(utf8[..written], hash);
        return Convert.ToHexString(hash);
    }
}

using Microsoft.Extensions.Options;

namespace DslaMesh.ModelService.Hosting;

/// <summary>
/// This replica's id and the addresses it advertises. Kestrel serves plain-text HTTP/2 (gRPC) only on an
/// HTTP/2-only endpoint, so the service listens twice: <c>Kestrel:Endpoints:Http</c> (HTTP/1.1 and HTTP/2: OpenAI API,
/// health, metrics) and <c>Kestrel:Endpoints:Grpc</c> (HTTP/2: gRPC).
/// </summary>
public sealed class ServiceIdentity
{
    private readonly ModelServiceOptions _options;
    private readonly IConfiguration _configuration;

    public ServiceIdentity(IOptions<ModelServiceOptions> options, IConfiguration configuration)
    {
        _options = options.Value;
        _configuration = configuration;
    }

    /// <summary>The HTTP address, e.g. <c>http://127.0.0.1:5100</c>.</summary>
    public string Address => _options.AdvertisedAddress ?? Loopback(_configuration["Kestrel:Endpoints:Http:Url"]) ?? "http://127.0.0.1:5100";

    /// <summary>The gRPC address, e.g. <c>http://127.0.0.1:5101</c>.</summary>
    public string GrpcAddress => _options.AdvertisedGrpcAddress ?? Loopback(_configuration["Kestrel:Endpoints:Grpc:Url"]) ?? Address;

    /// <summary>The replica id.</summary>
    public string Id => _options.ServiceId ?? $"{Environment.MachineName}-{new Uri(Address).Port}".ToLowerInvariant();

    private static string? Loopback(string? url) => url?
        .Replace("0.0.0.0", "127.0.0.1", StringComparison.Ordinal)
        .Replace("[::]", "127.0.0.1", StringComparison.Ordinal)
        .Replace("://*", "://127.0.0.1", StringComparison.Ordinal)
        .Replace("://+", "://127.0.0.1", StringComparison.Ordinal);
}

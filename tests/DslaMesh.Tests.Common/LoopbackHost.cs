using Microsoft.AspNetCore.Builder;
using Microsoft.Extensions.Configuration;
using Microsoft.Extensions.Logging;

namespace DslaMesh.Tests.Common;

/// <summary>
/// How the in-process hosts here start: a <see cref="WebApplication"/> listening on two free loopback ports (an HTTP
/// endpoint and an HTTP/2-only endpoint for h2c gRPC, as every DslaMesh service does), configured in memory.
/// </summary>
internal static class LoopbackHost
{
    /// <summary>
    /// A builder whose configuration holds the two endpoints, then <paramref name="defaults"/> (given the HTTP port),
    /// then <paramref name="settings"/>, later entries winning. Logging providers are cleared.
    /// </summary>
    public static (WebApplicationBuilder Builder, Uri Http, Uri Grpc) CreateBuilder(
        string httpProtocols, Func<int, IDictionary<string, string?>> defaults, IDictionary<string, string?>? settings)
    {
        var builder = WebApplication.CreateBuilder(new WebApplicationOptions { EnvironmentName = "Testing", ContentRootPath = AppContext.BaseDirectory });
        builder.Logging.ClearProviders();
        var port = RedisServer.FreePort();
        var grpcPort = RedisServer.FreePort();
        var values = new Dictionary<string, string?>
        {
            ["Kestrel:Endpoints:Http:Url"] = $"http://127.0.0.1:{port}",
            ["Kestrel:Endpoints:Http:Protocols"] = httpProtocols,
            ["Kestrel:Endpoints:Grpc:Url"] = $"http://127.0.0.1:{grpcPort}",
            ["Kestrel:Endpoints:Grpc:Protocols"] = "Http2",
        };
        foreach (var (key, value) in defaults(port).Concat(settings ?? new Dictionary<string, string?>()))
        {
            values[key] = value;
        }
        builder.Configuration.AddInMemoryCollection(values);
        return (builder, new Uri($"http://127.0.0.1:{port}"), new Uri($"http://127.0.0.1:{grpcPort}"));
    }
}

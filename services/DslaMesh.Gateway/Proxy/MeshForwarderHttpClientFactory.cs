using DslaMesh.Gateway.Hosting;
using Microsoft.Extensions.Options;
using Yarp.ReverseProxy.Forwarder;

namespace DslaMesh.Gateway.Proxy;

/// <summary>
/// YARP's client factory with a short connect timeout (a dead replica is detected, and the request retried elsewhere,
/// in seconds rather than after the 15 s default) and HTTP/2 keep-alive pings so that idle but live gRPC streams
/// survive NATs and load balancers between the gateway and the replicas. More than one HTTP/2 connection per replica
/// is allowed (YARP's default too, stated here because throughput at high concurrency depends on it): a replica's
/// Kestrel takes 100 concurrent streams per connection, so on one connection the 101st gRPC stream to a replica would
/// wait for a free slot; the gateway opens another connection instead (three to one replica at 256 streams in the
/// overhead bench).
/// </summary>
public sealed class MeshForwarderHttpClientFactory : ForwarderHttpClientFactory
{
    private readonly GatewayOptions _options;

    public MeshForwarderHttpClientFactory(ILogger<ForwarderHttpClientFactory> logger, IOptions<GatewayOptions> options) : base(logger)
    {
        ArgumentNullException.ThrowIfNull(options);
        _options = options.Value;
    }

    /// <inheritdoc/>
    protected override void ConfigureHandler(ForwarderHttpClientContext context, SocketsHttpHandler handler)
    {
        base.ConfigureHandler(context, handler);
        handler.EnableMultipleHttp2Connections = true;
        handler.ConnectTimeout = _options.ConnectTimeout;
        handler.KeepAlivePingDelay = TimeSpan.FromSeconds(30);
        handler.KeepAlivePingTimeout = TimeSpan.FromSeconds(20);
        handler.KeepAlivePingPolicy = HttpKeepAlivePingPolicy.WithActiveRequests;
    }
}

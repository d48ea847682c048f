using DslaMesh.Gateway.Hosting;
using Microsoft.Extensions.Options;
using Yarp.ReverseProxy.Forwarder;

namespace DslaMesh.Gateway.Proxy;

/// <summary>
/// YARP's client factory with a short connect timeout (a dead replica is detected, and the request retried elsewhere,
/// in seconds rather than after the 15 s default) and HTTP/2 keep-alive pings so that idle but live gRPC streams
/// survive NATs and load balancers between the gateway and the replicas.
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
        handler.ConnectTimeout = _options.ConnectTimeout;
        handler.KeepAlivePingDelay = TimeSpan.FromSeconds(30);
        handler.KeepAlivePingTimeout = TimeSpan.FromSeconds(20);
        handler.KeepAlivePingPolicy = HttpKeepAlivePingPolicy.WithActiveRequests;
    }
}

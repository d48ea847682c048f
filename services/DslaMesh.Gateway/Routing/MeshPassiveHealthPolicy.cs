using DslaMesh.Gateway.Hosting;
using Microsoft.Extensions.Options;
using Yarp.ReverseProxy;
using Yarp.ReverseProxy.Forwarder;
using Yarp.ReverseProxy.Health;
using Yarp.ReverseProxy.Model;

namespace DslaMesh.Gateway.Routing;

/// <summary>
/// Takes a replica out of rotation on its first transport failure (refused or timed-out connection, a stream that
/// broke off), in both clusters at once: the HTTP and gRPC destinations of one replica share a process, and a crash
/// takes both. YARP's default failure-rate policy waits for ten requests before acting, and a crashed replica would
/// keep failing new requests until then. The replica comes back after the reactivation period or the next passing
/// active probe.
/// </summary>
public sealed partial class MeshPassiveHealthPolicy : IPassiveHealthCheckPolicy
{
    /// <summary>The name clusters refer to.</summary>
    public const string PolicyName = "DslaMeshTransportFailure";

    private readonly IDestinationHealthUpdater _updater;
    private readonly IServiceProvider _services;
    private readonly GatewayHealthOptions _options;
    private readonly ILogger<MeshPassiveHealthPolicy> _logger;

    /// <remarks>
    /// The proxy state is looked up on use: YARP builds its configuration manager with the passive policies, so asking
    /// for it here would be a construction cycle.
    /// </remarks>
    public MeshPassiveHealthPolicy(IDestinationHealthUpdater updater, IServiceProvider services, IOptions<GatewayOptions> options, ILogger<MeshPassiveHealthPolicy> logger)
    {
        ArgumentNullException.ThrowIfNull(options);
        _updater = updater;
        _services = services;
        _options = options.Value.Health;
        _logger = logger;
    }

    /// <inheritdoc/>
    public string Name => PolicyName;

    /// <inheritdoc/>
    public void RequestProxied(HttpContext context, ClusterState cluster, DestinationState destination)
    {
        ArgumentNullException.ThrowIfNull(context);
        ArgumentNullException.ThrowIfNull(cluster);
        ArgumentNullException.ThrowIfNull(destination);
        if (context.Features.Get<IForwarderErrorFeature>()?.Error is not (ForwarderError.Request or ForwarderError.RequestTimedOut
            or ForwarderError.ResponseBodyDestination or ForwarderError.RequestBodyDestination) || destination.Health.Passive == DestinationHealth.Unhealthy)
        {
            return;
        }
        var period = cluster.Model.Config.HealthCheck?.Passive?.ReactivationPeriod ?? _options.ReactivationPeriod;
        Log.MarkedUnhealthy(_logger, destination.DestinationId, context.Features.Get<IForwarderErrorFeature>()!.Error, period.TotalSeconds);
        _updater.SetPassive(cluster, destination, DestinationHealth.Unhealthy, period);
        foreach (var other in _services.GetRequiredService<IProxyStateLookup>().GetClusters())
        {
            if (other != cluster && other.Destinations.TryGetValue(destination.DestinationId, out var twin) && twin.Health.Passive != DestinationHealth.Unhealthy)
            {
                _updater.SetPassive(other, twin, DestinationHealth.Unhealthy, period);
            }
        }
    }

    private static partial class Log
    {
        [LoggerMessage(200, LogLevel.Warning, "Replica {Replica} out of rotation for {Seconds} s after a transport failure ({Error})", EventName = "ReplicaMarkedUnhealthy")]
        public static partial void MarkedUnhealthy(ILogger logger, string replica, ForwarderError error, double seconds);
    }
}

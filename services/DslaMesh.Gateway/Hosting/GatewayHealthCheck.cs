using DslaMesh.Gateway.Discovery;
using Microsoft.Extensions.Diagnostics.HealthChecks;

namespace DslaMesh.Gateway.Hosting;

/// <summary>
/// Ready once the registry has been read; degraded (still 200: the gateway keeps routing to the replicas it knows)
/// while Redis is unreachable or no replica is registered.
/// </summary>
public sealed class GatewayHealthCheck : IHealthCheck
{
    private readonly FleetDiscovery _discovery;
    private readonly FleetView _fleet;

    public GatewayHealthCheck(FleetDiscovery discovery, FleetView fleet)
    {
        _discovery = discovery;
        _fleet = fleet;
    }

    /// <inheritdoc/>
    public Task<HealthCheckResult> CheckHealthAsync(HealthCheckContext context, CancellationToken cancellationToken = default) => Task.FromResult(
        !_discovery.FirstRefresh.IsCompletedSuccessfully ? HealthCheckResult.Unhealthy("the fleet registry has not been read yet")
        : _fleet.RegistryUnavailable ? HealthCheckResult.Degraded($"Redis unreachable; routing to {_fleet.Replicas.Count} known replica(s)")
        : _fleet.Replicas.Count == 0 ? HealthCheckResult.Degraded("no model service registered")
        : HealthCheckResult.Healthy($"{_fleet.Replicas.Count} replica(s)"));
}

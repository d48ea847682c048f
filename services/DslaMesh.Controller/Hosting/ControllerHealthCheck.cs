using DslaMesh.Controller.Control;
using Microsoft.Extensions.Diagnostics.HealthChecks;

namespace DslaMesh.Controller.Hosting;

/// <summary>Healthy while the control loop reaches Redis; Degraded (services keep their layers) while it does not.</summary>
public sealed class ControllerHealthCheck(FleetController fleet) : IHealthCheck
{
    /// <inheritdoc/>
    public Task<HealthCheckResult> CheckHealthAsync(HealthCheckContext context, CancellationToken cancellationToken = default) =>
        Task.FromResult(fleet.ExecuteTask is { IsCompleted: true }
            ? HealthCheckResult.Unhealthy("the control loop stopped")
            : fleet.RedisHealthy
                ? HealthCheckResult.Healthy(fleet.IsLeader ? "leader" : "standby")
                : HealthCheckResult.Degraded("Redis unreachable; holding layers"));
}

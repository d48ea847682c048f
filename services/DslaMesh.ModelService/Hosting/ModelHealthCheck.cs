using Microsoft.Extensions.Diagnostics.HealthChecks;

namespace DslaMesh.ModelService.Hosting;

/// <summary>Ready only once the model is loaded and while the service is not draining.</summary>
public sealed class ModelHealthCheck : IHealthCheck
{
    private readonly ModelHost _host;

    public ModelHealthCheck(ModelHost host) => _host = host;

    /// <inheritdoc/>
    public Task<HealthCheckResult> CheckHealthAsync(HealthCheckContext context, CancellationToken cancellationToken = default) => Task.FromResult(
        _host.LoadError is { } error ? HealthCheckResult.Unhealthy($"model failed to load: {error.Message}")
        : _host.Engine is not { } engine ? HealthCheckResult.Unhealthy("model loading")
        : engine.IsDraining ? HealthCheckResult.Unhealthy("draining")
        : HealthCheckResult.Healthy("ready"));
}

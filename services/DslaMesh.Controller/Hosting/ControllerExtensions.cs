using DslaMesh.Controller.Admin;
using DslaMesh.Controller.Control;
using DslaMesh.Controller.Hosting;
using DslaMesh.Controller.Metrics;
using DslaMesh.Controller.Policies;
using Microsoft.AspNetCore.Diagnostics.HealthChecks;
using Microsoft.Extensions.DependencyInjection.Extensions;
using Microsoft.Extensions.Diagnostics.HealthChecks;
using Prometheus;

namespace Microsoft.Extensions.DependencyInjection;

/// <summary>Registers and maps the controller.</summary>
public static class ControllerExtensions
{
    /// <summary>Options, Redis, the policy store, the control loop, the admin gRPC service and health checks.</summary>
    public static IHostApplicationBuilder AddController(this IHostApplicationBuilder builder)
    {
        ArgumentNullException.ThrowIfNull(builder);
        var services = builder.Services;
        services.AddOptionsWithValidateOnStart<ControllerOptions, ControllerOptionsValidator>()
            .BindConfiguration(ControllerOptions.SectionName)
            .PostConfigure(o => o.AdminToken = string.IsNullOrEmpty(o.AdminToken) ? Environment.GetEnvironmentVariable(ControllerOptions.TokenVariable) : o.AdminToken);
        services.AddOptionsWithValidateOnStart<RedisOptions, RedisOptionsValidator>().BindConfiguration(RedisOptions.SectionName);
        services.TryAddSingleton(TimeProvider.System);
        services.TryAddSingleton<RedisConnection>();
        services.TryAddSingleton<EpochFence>();
        services.TryAddSingleton<PolicyStore>();
        services.TryAddSingleton<ControllerMetrics>();
        services.TryAddSingleton<FleetController>();
        services.AddHostedService(sp => sp.GetRequiredService<FleetController>());
        services.TryAddSingleton<AdminTokenInterceptor>();
        services.AddGrpc(o => o.EnableDetailedErrors = false).AddServiceOptions<AdminGrpcService>(o => o.Interceptors.Add<AdminTokenInterceptor>());
        services.AddHealthChecks().AddCheck<ControllerHealthCheck>("controller", tags: ["ready"]);
        services.AddGrpcHealthChecks().AddCheck<ControllerHealthCheck>("grpc-controller");
        return builder;
    }

    /// <summary>The admin gRPC service, gRPC health, <c>/health</c> and Prometheus <c>/metrics</c>.</summary>
    public static WebApplication MapController(this WebApplication app)
    {
        ArgumentNullException.ThrowIfNull(app);
        app.MapGrpcService<AdminGrpcService>();
        app.MapGrpcHealthChecksService();
        var metrics = app.Services.GetRequiredService<ControllerMetrics>();
        var fleet = app.Services.GetRequiredService<FleetController>();
        var policies = app.Services.GetRequiredService<PolicyStore>();
        metrics.Registry.AddBeforeCollectCallback(() => metrics.Refresh(fleet.IsLeader, fleet.RedisHealthy, policies.Current.Version, fleet.Snapshot()));
        app.MapMetrics("/metrics", metrics.Registry);
        app.MapHealthChecks("/health", new HealthCheckOptions
        {
            ResultStatusCodes =
            {
                [HealthStatus.Healthy] = StatusCodes.Status200OK,
                [HealthStatus.Degraded] = StatusCodes.Status200OK,
                [HealthStatus.Unhealthy] = StatusCodes.Status503ServiceUnavailable,
            },
        });
        return app;
    }
}

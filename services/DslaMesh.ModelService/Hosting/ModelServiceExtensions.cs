using DslaMesh.ModelService.Grpc;
using DslaMesh.ModelService.Hosting;
using DslaMesh.ModelService.Http;
using DslaMesh.ModelService.Metrics;
using DslaMesh.ModelService.Registry;
using Microsoft.AspNetCore.Diagnostics.HealthChecks;
using Microsoft.AspNetCore.Server.Kestrel.Core;
using Microsoft.Extensions.DependencyInjection.Extensions;
using Microsoft.Extensions.Diagnostics.HealthChecks;
using Microsoft.Extensions.Options;
using Prometheus;

namespace Microsoft.Extensions.DependencyInjection;

/// <summary>Registers and maps the model service.</summary>
public static class ModelServiceExtensions
{
    /// <summary>Options, the model host, metrics, Redis publishing, gRPC and health checks.</summary>
    public static IHostApplicationBuilder AddModelService(this IHostApplicationBuilder builder)
    {
        var services = builder.Services;
        services.AddOptionsWithValidateOnStart<ModelServiceOptions, ModelServiceOptionsValidator>().BindConfiguration(ModelServiceOptions.SectionName);
        services.AddOptionsWithValidateOnStart<RedisOptions, RedisOptionsValidator>().BindConfiguration(RedisOptions.SectionName);
        services.TryAddSingleton(TimeProvider.System);
        services.TryAddSingleton<ServiceMetrics>();
        services.TryAddSingleton<ServiceIdentity>();
        services.TryAddSingleton<ModelHost>();
        services.AddHostedService(sp => sp.GetRequiredService<ModelHost>());
        services.AddHostedService<RedisPublisher>();
        // Drains in the host's Stopping phase, before Kestrel stops listening, so health answers 503 meanwhile.
        services.AddHostedService<DrainService>();
        services.AddGrpc(o => o.EnableDetailedErrors = false);
        services.AddHealthChecks().AddCheck<ModelHealthCheck>("model", tags: ["ready"]);
        services.AddGrpcHealthChecks().AddCheck<ModelHealthCheck>("grpc-model");
        services.AddOptions<KestrelServerOptions>().Configure<IOptions<ModelServiceOptions>>((kestrel, options) =>
        {
            kestrel.Limits.MaxRequestBodySize = options.Value.MaxRequestBodyBytes;
            // Streams can be long and quiet during a slow prefill; keep HTTP/2 connections alive.
            kestrel.Limits.Http2.KeepAlivePingDelay = TimeSpan.FromSeconds(30);
        });
        services.AddOptions<HostOptions>().Configure<IOptions<ModelServiceOptions>>((host, options) => host.ShutdownTimeout = options.Value.DrainTimeout + TimeSpan.FromSeconds(5));
        return builder;
    }

    /// <summary>gRPC services, OpenAI HTTP routes, /health, /metrics; starts draining on shutdown.</summary>
    public static WebApplication MapModelService(this WebApplication app)
    {
        var host = app.Services.GetRequiredService<ModelHost>();
        var metrics = app.Services.GetRequiredService<ServiceMetrics>();
        metrics.SnapshotSource = () => host.Engine?.Snapshot;
        app.Lifetime.ApplicationStopping.Register(() => host.Engine?.BeginDrain());

        app.MapGrpcService<GenerationGrpcService>();
        app.MapGrpcService<LayerControlGrpcService>();
        app.MapGrpcHealthChecksService();
        app.MapOpenAi();
        app.MapHealthChecks("/health", new HealthCheckOptions
        {
            ResultStatusCodes =
            {
                [HealthStatus.Healthy] = StatusCodes.Status200OK,
                [HealthStatus.Degraded] = StatusCodes.Status503ServiceUnavailable,
                [HealthStatus.Unhealthy] = StatusCodes.Status503ServiceUnavailable,
            },
        });
        app.MapMetrics("/metrics", metrics.Registry);
        return app;
    }
}

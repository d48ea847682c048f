using System.Text.Json;
using DslaMesh.Gateway.Discovery;
using DslaMesh.Gateway.Hosting;
using DslaMesh.Gateway.Proxy;
using DslaMesh.Gateway.Routing;
using DslaMesh.Gateway.Security;
using Microsoft.AspNetCore.Authentication;
using Microsoft.AspNetCore.Diagnostics.HealthChecks;
using Microsoft.AspNetCore.Server.Kestrel.Core;
using Microsoft.Extensions.DependencyInjection.Extensions;
using Microsoft.Extensions.Diagnostics.HealthChecks;
using Microsoft.Extensions.Options;
using Yarp.ReverseProxy.Configuration;
using Yarp.ReverseProxy.Forwarder;
using Yarp.ReverseProxy.Health;
using Yarp.ReverseProxy.LoadBalancing;
using Yarp.ReverseProxy.Transforms;

namespace Microsoft.Extensions.DependencyInjection;

/// <summary>Registers and maps the gateway.</summary>
public static class GatewayExtensions
{
    /// <summary>Options, fleet discovery, YARP with the mesh policies, API keys, rate limits, health checks.</summary>
    public static IHostApplicationBuilder AddGateway(this IHostApplicationBuilder builder)
    {
        ArgumentNullException.ThrowIfNull(builder);
        var services = builder.Services;
        services.AddOptionsWithValidateOnStart<GatewayOptions, GatewayOptionsValidator>().BindConfiguration(GatewayOptions.SectionName);
        services.AddOptionsWithValidateOnStart<RedisOptions, RedisOptionsValidator>().BindConfiguration(RedisOptions.SectionName);
        services.TryAddSingleton(TimeProvider.System);
        services.TryAddSingleton<FleetView>();
        services.TryAddSingleton<FleetProxyConfigProvider>();
        services.TryAddSingleton<FleetDiscovery>();
        services.AddHostedService(sp => sp.GetRequiredService<FleetDiscovery>());
        services.TryAddSingleton<ApiKeyStore>();
        services.TryAddSingleton<MeshProxyMiddleware>();

        services.AddSingleton<IProxyConfigProvider>(sp => sp.GetRequiredService<FleetProxyConfigProvider>());
        services.AddSingleton<IForwarderHttpClientFactory, MeshForwarderHttpClientFactory>();
        services.TryAddEnumerable(ServiceDescriptor.Singleton<ILoadBalancingPolicy, MeshLoadBalancingPolicy>());
        services.TryAddEnumerable(ServiceDescriptor.Singleton<IPassiveHealthCheckPolicy, MeshPassiveHealthPolicy>());
        services.AddReverseProxy().AddTransforms(context =>
        {
            // Keys are the gateway's business; replicas never see them.
            context.AddRequestHeaderRemove("Authorization");
            context.AddRequestHeaderRemove("x-api-key");
            context.AddResponseTransform(MeshProxyMiddleware.OnResponse);
        });

        services.AddAuthentication(ApiKeyDefaults.Scheme).AddScheme<AuthenticationSchemeOptions, ApiKeyAuthenticationHandler>(ApiKeyDefaults.Scheme, null);
        services.AddAuthorizationBuilder().AddPolicy(ApiKeyDefaults.PolicyName, policy => policy.AddAuthenticationSchemes(ApiKeyDefaults.Scheme).RequireAuthenticatedUser());
        services.AddRateLimiter(options => options.AddPolicy<string, ApiKeyRateLimiterPolicy>(ApiKeyDefaults.RateLimiterPolicyName));

        services.AddHealthChecks().AddCheck<GatewayHealthCheck>("fleet", tags: ["ready"]);
        services.AddOptions<KestrelServerOptions>().Configure<IOptions<GatewayOptions>>((kestrel, options) =>
        {
            kestrel.Limits.MaxRequestBodySize = options.Value.MaxRequestBodyBytes;
            kestrel.Limits.Http2.KeepAlivePingDelay = TimeSpan.FromSeconds(30);
            // Many concurrent streams per client connection (one HTTP/2 connection per gRPC channel).
            kestrel.Limits.Http2.MaxStreamsPerConnection = 1000;
        });
        return builder;
    }

    /// <summary>The proxy, /v1/models (the fleet's models), /health (readiness) and /alive (liveness).</summary>
    public static WebApplication MapGateway(this WebApplication app)
    {
        ArgumentNullException.ThrowIfNull(app);
        var options = app.Services.GetRequiredService<IOptions<GatewayOptions>>().Value;
        app.UseAuthentication();
        app.UseAuthorization();
        app.UseRateLimiter();

        var mesh = app.Services.GetRequiredService<MeshProxyMiddleware>();
        app.MapReverseProxy(pipeline =>
        {
            pipeline.Use(mesh.InvokeAsync);
            pipeline.UseLoadBalancing();
            pipeline.UsePassiveHealthChecks();
        });
        var models = app.MapGet("/v1/models", (FleetView fleet) => Results.Bytes(ModelList(fleet), "application/json"));
        if (options.RequireApiKey)
        {
            models.RequireAuthorization(ApiKeyDefaults.PolicyName);
        }
        app.MapHealthChecks("/health", new HealthCheckOptions
        {
            Predicate = check => check.Tags.Contains("ready"),
            ResultStatusCodes =
            {
                [HealthStatus.Healthy] = StatusCodes.Status200OK,
                [HealthStatus.Degraded] = StatusCodes.Status200OK,
                [HealthStatus.Unhealthy] = StatusCodes.Status503ServiceUnavailable,
            },
        });
        app.MapHealthChecks("/alive", new HealthCheckOptions { Predicate = _ => false });
        return app;
    }

    /// <summary>OpenAI <c>GET /v1/models</c> over the whole fleet: one entry per model, with its replica count.</summary>
    private static byte[] ModelList(FleetView fleet)
    {
        using var buffer = new MemoryStream();
        using (var writer = new Utf8JsonWriter(buffer))
        {
            writer.WriteStartObject();
            writer.WriteString("object", "list");
            writer.WriteStartArray("data");
            foreach (var model in fleet.Replicas.Values.GroupBy(r => r.Model, StringComparer.Ordinal).OrderBy(g => g.Key, StringComparer.Ordinal))
            {
                var first = model.MinBy(r => r.StartedAt)!;
                writer.WriteStartObject();
                writer.WriteString("id", model.Key);
                writer.WriteString("object", "model");
                writer.WriteNumber("created", first.StartedAt.ToUnixTimeSeconds());
                writer.WriteString("owned_by", "dslamesh");
                writer.WriteNumber("max_model_len", first.ContextLength);
                writer.WriteNumber("layer_count", first.LayerCount);
                writer.WriteNumber("replicas", model.Count());
                writer.WriteEndObject();
            }
            writer.WriteEndArray();
            writer.WriteEndObject();
        }
        return buffer.ToArray();
    }
}

using System.Net.Http.Headers;
using DslaMesh.Gateway.Discovery;
using DslaMesh.Protos.V1;
using Grpc.Core;
using Grpc.Net.Client;
using Microsoft.AspNetCore.Builder;
using Microsoft.Extensions.DependencyInjection;
using Yarp.ReverseProxy;

namespace DslaMesh.Tests.Common;

/// <summary>A real gateway on Kestrel (HTTP/1.1+2 and h2c endpoints on free loopback ports), built like Program.cs.</summary>
public sealed class GatewayHost : IAsyncDisposable
{
    /// <summary>The key of tenant "alpha" (generous limits).</summary>
    public const string Key = "test-key-alpha-0123456789";

    /// <summary>The key of tenant "tiny" (2 requests, then 1 every 10 s).</summary>
    public const string TinyKey = "test-key-tiny-0123456789";

    private readonly WebApplication _app;

    private GatewayHost(WebApplication app, Uri address, Uri grpcAddress)
    {
        _app = app;
        Address = address;
        GrpcAddress = grpcAddress;
        Http = new HttpClient { BaseAddress = address, Timeout = TimeSpan.FromSeconds(60) };
        Http.DefaultRequestHeaders.Authorization = new AuthenticationHeaderValue("Bearer", Key);
        Channel = GrpcChannel.ForAddress(grpcAddress);
    }

    public Uri Address { get; }
    public Uri GrpcAddress { get; }

    /// <summary>Sends the alpha key.</summary>
    public HttpClient Http { get; }

    public GrpcChannel Channel { get; }
    public Generation.GenerationClient Generation => new(Channel);
    public IServiceProvider Services => _app.Services;

    /// <summary>gRPC call options carrying a key.</summary>
    public static CallOptions WithKey(CancellationToken cancellationToken, string? key = Key) =>
        new(key is null ? null : new Metadata { { "authorization", $"Bearer {key}" } }, cancellationToken: cancellationToken);

    public static async Task<GatewayHost> StartAsync(string redis, string prefix, IDictionary<string, string?>? settings = null)
    {
        var (builder, address, grpcAddress) = LoopbackHost.CreateBuilder("Http1AndHttp2", _ => new Dictionary<string, string?>
        {
            ["Redis:Configuration"] = redis,
            ["Redis:Prefix"] = prefix,
            ["Gateway:ApiKeys:0:Name"] = "alpha",
            ["Gateway:ApiKeys:0:Key"] = Key,
            ["Gateway:ApiKeys:0:RequestsPerSecond"] = "1000",
            ["Gateway:ApiKeys:0:Burst"] = "1000",
            ["Gateway:ApiKeys:1:Name"] = "tiny",
            ["Gateway:ApiKeys:1:Key"] = TinyKey,
            ["Gateway:ApiKeys:1:RequestsPerSecond"] = "0.1",
            ["Gateway:ApiKeys:1:Burst"] = "2",
            ["Gateway:MaxRequestBodyBytes"] = "65536",
            ["Gateway:Health:ActiveInterval"] = "00:00:00.500",
        }, settings);
        builder.AddGateway();
        var app = builder.Build();
        app.MapGateway();
        await app.StartAsync().ConfigureAwait(false);
        await app.Services.GetRequiredService<FleetDiscovery>().FirstRefresh.WaitAsync(TimeSpan.FromSeconds(30)).ConfigureAwait(false);
        return new GatewayHost(app, address, grpcAddress);
    }

    /// <summary>The replica ids YARP currently routes to in a cluster.</summary>
    public IReadOnlyCollection<string> Destinations(string cluster = FleetProxyConfigProvider.OpenAiCluster) =>
        Services.GetRequiredService<IProxyStateLookup>().TryGetCluster(cluster, out var state) ? [.. state.Destinations.Keys] : [];

    /// <summary>Waits until the gateway routes to exactly these replicas.</summary>
    public async Task WaitForReplicasAsync(IReadOnlyCollection<string> ids, CancellationToken cancellationToken, double seconds = 20)
    {
        var deadline = DateTime.UtcNow.AddSeconds(seconds);
        while (!(Destinations().Order().SequenceEqual(ids.Order()) && Destinations(FleetProxyConfigProvider.GrpcCluster).Count == ids.Count))
        {
            if (DateTime.UtcNow > deadline)
            {
                throw new TimeoutException($"gateway routes to [{string.Join(", ", Destinations())}], expected [{string.Join(", ", ids)}]");
            }
            await Task.Delay(20, cancellationToken).ConfigureAwait(false);
        }
    }

    public async ValueTask DisposeAsync()
    {
        Http.Dispose();
        Channel.Dispose();
        await _app.StopAsync().ConfigureAwait(false);
        await _app.DisposeAsync().ConfigureAwait(false);
    }
}

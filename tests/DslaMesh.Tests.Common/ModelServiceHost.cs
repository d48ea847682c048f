using DslaMesh.ModelService.Hosting;
using DslaMesh.Protos.V1;
using Grpc.Net.Client;
using Microsoft.AspNetCore.Builder;
using Microsoft.Extensions.DependencyInjection;

namespace DslaMesh.Tests.Common;

/// <summary>A real model service on Kestrel, 127.0.0.1 and a free port, with real gRPC and HTTP clients.</summary>
public sealed class ModelServiceHost : IAsyncDisposable
{
    private readonly WebApplication _app;

    private ModelServiceHost(WebApplication app, Uri address, Uri grpcAddress)
    {
        _app = app;
        Address = address;
        GrpcAddress = grpcAddress;
        Http = new HttpClient { BaseAddress = address, Timeout = TimeSpan.FromSeconds(60) };
        Channel = GrpcChannel.ForAddress(grpcAddress);
    }

    /// <summary>The service id it registers under (<c>test-{http port}</c> unless the settings name one).</summary>
    public string Id => Services.GetRequiredService<ServiceIdentity>().Id;

    public Uri Address { get; }
    public Uri GrpcAddress { get; }
    public HttpClient Http { get; }
    public GrpcChannel Channel { get; }
    public Generation.GenerationClient Generation => new(Channel);
    public LayerControl.LayerControlClient Control => new(Channel);
    public ModelHost Model => _app.Services.GetRequiredService<ModelHost>();
    public IServiceProvider Services => _app.Services;

    /// <summary>Starts a service for a model folder and waits until the model is loaded.</summary>
    public static async Task<ModelServiceHost> StartAsync(string modelPath, string? redis, IDictionary<string, string?>? settings = null)
    {
        var (builder, address, grpcAddress) = LoopbackHost.CreateBuilder("Http1AndHttp2", port => new Dictionary<string, string?>
        {
            ["ModelService:ModelPath"] = modelPath,
            ["ModelService:ServiceId"] = $"test-{port}",
            ["ModelService:DrainTimeout"] = "00:00:10",
            ["ModelService:Engine:PrefillChunkTokens"] = "8",
            ["Redis:Configuration"] = redis ?? "",
            ["Redis:PublishPeriod"] = "00:00:00.100",
        }, settings);
        builder.AddModelService();
        var app = builder.Build();
        app.MapModelService();
        await app.StartAsync().ConfigureAwait(false);
        var host = new ModelServiceHost(app, address, grpcAddress);
        await host.Model.Ready.WaitAsync(TimeSpan.FromSeconds(60)).ConfigureAwait(false);
        return host;
    }

    /// <summary>Graceful stop (drain, deregister).</summary>
    public Task StopAsync() => _app.StopAsync();

    public async ValueTask DisposeAsync()
    {
        Http.Dispose();
        Channel.Dispose();
        await _app.StopAsync().ConfigureAwait(false);
        await _app.DisposeAsync().ConfigureAwait(false);
    }
}

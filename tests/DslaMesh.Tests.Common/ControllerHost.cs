using DslaMesh.Controller.Control;
using DslaMesh.Controller.Policies;
using DslaMesh.Protos.V1;
using Grpc.Core;
using Grpc.Net.Client;
using Microsoft.AspNetCore.Builder;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Logging;

namespace DslaMesh.Tests.Common;

/// <summary>A real controller on Kestrel (HTTP and h2c gRPC on free loopback ports) with an authenticated admin client.</summary>
public sealed class ControllerHost : IAsyncDisposable
{
    public const string Token = "test-admin-token-0123456789";

    private readonly WebApplication _app;
    private bool _stopped;

    private ControllerHost(WebApplication app, Uri address, Uri grpcAddress, ErrorLog log)
    {
        _app = app;
        Log = log;
        Address = address;
        GrpcAddress = grpcAddress;
        var credentials = CallCredentials.FromInterceptor((_, metadata) =>
        {
            metadata.Add("authorization", $"Bearer {Token}");
            return Task.CompletedTask;
        });
        Channel = GrpcChannel.ForAddress(grpcAddress, new GrpcChannelOptions
        {
            Credentials = ChannelCredentials.Create(ChannelCredentials.Insecure, credentials),
            UnsafeUseInsecureChannelCallCredentials = true,
        });
        Admin = new ControllerAdmin.ControllerAdminClient(Channel);
    }

    /// <summary>The controller's warnings and errors.</summary>
    public ErrorLog Log { get; }

    public Uri Address { get; }
    public Uri GrpcAddress { get; }
    public GrpcChannel Channel { get; }
    public ControllerAdmin.ControllerAdminClient Admin { get; }
    public FleetController Fleet => _app.Services.GetRequiredService<FleetController>();
    public PolicyStore Policies => _app.Services.GetRequiredService<PolicyStore>();

    /// <summary>Starts a controller and waits until its first tick has reached Redis.</summary>
    public static async Task<ControllerHost> StartAsync(string redis, string prefix, IDictionary<string, string?>? settings = null)
    {
        var (builder, address, grpcAddress) = LoopbackHost.CreateBuilder("Http1", _ => new Dictionary<string, string?>
        {
            ["Controller:AdminToken"] = Token,
            ["Controller:TickPeriod"] = "00:00:00.050",
            ["Controller:ReconnectDelay"] = "00:00:00.050",
            ["Controller:MaxReconnectDelay"] = "00:00:00.500",
            ["Controller:LeaseTtl"] = "00:00:02",
            ["Redis:Configuration"] = redis,
            ["Redis:Prefix"] = prefix,
            ["Redis:CommandTimeout"] = "00:00:00.500",
        }, settings);
        var log = new ErrorLog();
        builder.Logging.AddProvider(log);
        builder.AddController();
        var app = builder.Build();
        app.MapController();
        await app.StartAsync().ConfigureAwait(false);
        return new ControllerHost(app, address, grpcAddress, log);
    }

    /// <summary>dslactl's common arguments for this controller.</summary>
    public string[] CliArgs => ["--controller", GrpcAddress.ToString(), "--token", Token];

    /// <summary>Graceful stop (releases the leader lease).</summary>
    public async Task StopAsync()
    {
        if (!_stopped)
        {
            _stopped = true;
            await _app.StopAsync().ConfigureAwait(false);
        }
    }

    public async ValueTask DisposeAsync()
    {
        Channel.Dispose();
        await StopAsync().ConfigureAwait(false);
        await _app.DisposeAsync().ConfigureAwait(false);
        var dump = Environment.GetEnvironmentVariable("DSLAMESH_TEST_LOG");
        if (!string.IsNullOrEmpty(dump))
        {
            await File.AppendAllLinesAsync(dump, Log.Entries).ConfigureAwait(false);
        }
        // Like a VerifyNoErrors scope: the controller must not log errors in any of these scenarios.
        Assert.True(Log.Errors.Count == 0, "controller errors:\n" + string.Join("\n", Log.Errors));
    }
}

using System.CommandLine;
using System.Diagnostics;
using DslaMesh.Cli.Commands;
using DslaMesh.Protos.V1;
using DslaMesh.Tests.Common;

namespace DslaMesh.Controller.Tests.Infrastructure;

/// <summary>A model folder with foldable DSLA weights for every test of the assembly.</summary>
public sealed class ModelFixture : IDisposable
{
    public string ModelPath { get; } = ModelFolders.WithFoldableDsla();

    public void Dispose() => Directory.Delete(ModelPath, recursive: true);
}

/// <summary>A real Redis, real model services registered in it, and a real controller, all on loopback.</summary>
public sealed class TestFleet : IAsyncDisposable
{
    private TestFleet(RedisServer redis, string prefix, IReadOnlyList<ModelServiceHost> services)
    {
        Redis = redis;
        Prefix = prefix;
        Services = services;
    }

    /// <summary>
    /// How long a test waits for the fleet to reach the state it starts from (services discovered, streams connected,
    /// the first policy applied). Generous on purpose: only the waits that measure a requirement use tight bounds.
    /// </summary>
    public static readonly TimeSpan SetupBound = TimeSpan.FromSeconds(15);

    public RedisServer Redis { get; }
    public string Prefix { get; }
    public IReadOnlyList<ModelServiceHost> Services { get; }
    public ControllerHost? Controller { get; set; }

    /// <summary>Starts Redis, the services (in parallel), optionally stores a policy, then the controller.</summary>
    public static async Task<TestFleet> StartAsync(string modelPath, int services = 2, string? policyJson = null)
    {
        var redis = await RedisServer.StartAsync().ConfigureAwait(false);
        var prefix = "t" + Guid.NewGuid().ToString("N")[..8];
        var hosts = await Task.WhenAll(Enumerable.Range(0, services).Select(_ => ModelServiceHost.StartAsync(modelPath, redis.Configuration, new Dictionary<string, string?>
        {
            ["Redis:Prefix"] = prefix,
        }))).ConfigureAwait(false);
        var fleet = new TestFleet(redis, prefix, hosts);
        fleet.Controller = await fleet.StartControllerAsync().ConfigureAwait(false);
        if (policyJson is not null)
        {
            await fleet.Controller.Admin.SetPolicyAsync(new SetPolicyRequest { PolicyJson = policyJson, Comment = "test" });
        }
        return fleet;
    }

    public Task<ControllerHost> StartControllerAsync(IDictionary<string, string?>? settings = null) => ControllerHost.StartAsync(Redis.Configuration, Prefix, settings);

    /// <summary>Each service's DSLA layers, asked of the service itself.</summary>
    public async Task<ConversionState[]> StatesAsync(CancellationToken ct) =>
        await Task.WhenAll(Services.Select(s => s.Control.GetStateAsync(new GetStateRequest(), cancellationToken: ct).ResponseAsync)).ConfigureAwait(false);

    /// <summary>Waits until every service runs exactly these DSLA layers; returns how long it took.</summary>
    public async Task<TimeSpan> WaitForLayersAsync(int[] layers, TimeSpan within, CancellationToken ct)
    {
        var watch = Stopwatch.StartNew();
        while (true)
        {
            var states = await StatesAsync(ct).ConfigureAwait(false);
            if (states.All(s => s.DslaLayers.Order().SequenceEqual(layers)))
            {
                return watch.Elapsed;
            }
            Assert.True(watch.Elapsed < within,
                $"within {within.TotalSeconds} s every service should run DSLA layers [{string.Join(",", layers)}]; they run {string.Join(" and ", states.Select(s => $"{s.ServiceId}: [{string.Join(",", s.DslaLayers)}] at epoch {s.Epoch}"))}");
            await Task.Delay(20, ct).ConfigureAwait(false);
        }
    }

    /// <summary>Waits until the controller has a connected control stream to every service.</summary>
    public async Task WaitForStreamsAsync(ControllerHost controller, CancellationToken ct, int seconds = 10)
    {
        var watch = Stopwatch.StartNew();
        while (true)
        {
            var status = controller.Fleet.Snapshot();
            if (status.Count == Services.Count && status.All(s => s.Connected))
            {
                return;
            }
            Assert.True(watch.Elapsed < TimeSpan.FromSeconds(seconds), $"the controller has streams to {status.Count(s => s.Connected)} of {Services.Count} services after {seconds} s");
            await Task.Delay(20, ct).ConfigureAwait(false);
        }
    }

    /// <summary>Runs dslactl in-process.</summary>
    public static async Task<(int Code, string Out, string Err)> Dslactl(params string[] args)
    {
        using var output = new StringWriter();
        using var error = new StringWriter();
        var code = await DslaCtl.CreateRootCommand().Parse(args).InvokeAsync(new InvocationConfiguration { Output = output, Error = error }, TestContext.Current.CancellationToken).ConfigureAwait(false);
        return (code, output.ToString(), error.ToString());
    }

    public async ValueTask DisposeAsync()
    {
        if (Controller is not null)
        {
            await Controller.DisposeAsync().ConfigureAwait(false);
        }
        await Task.WhenAll(Services.Select(s => s.DisposeAsync().AsTask())).ConfigureAwait(false);
        await Redis.DisposeAsync().ConfigureAwait(false);
    }
}

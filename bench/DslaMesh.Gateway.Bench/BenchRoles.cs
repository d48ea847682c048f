using System.Globalization;
using System.Runtime.InteropServices;
using DslaMesh.Fleet;
using DslaMesh.Gateway.Discovery;

namespace DslaMesh.Gateway.Bench;

/// <summary>The gateway as the bench runs it: the product's own <c>AddGateway</c>/<c>MapGateway</c> host.</summary>
public static class BenchGateway
{
    /// <summary>The bench's API key (the gateway checks keys as deployed; rate limits are off).</summary>
    public const string Key = "bench-key-0123456789abcdef";

    /// <summary>A Redis address nothing listens on: with the static registry the gateway's discovery finds no Redis.</summary>
    private const string NoRedis = "127.0.0.1:1";

    /// <summary>
    /// Starts the gateway. <paramref name="productHost"/>: built as services/DslaMesh.Gateway/Program.cs builds it when
    /// deployed (content root = the app folder, so the gateway's appsettings.json applies with its console logging and
    /// log levels); otherwise with logging providers cleared, as the in-process bench always did. With
    /// <paramref name="staticReplica"/> the gateway is given that replica (and its idle metrics each second) instead
    /// of reading Redis: same routes, clusters, routing policy and health checks, no registry.
    /// <paramref name="h2StreamsPerConnection"/> (an experiment, not a product setting) replaces the gateway's
    /// Kestrel HTTP/2 streams-per-connection limit (1000), e.g. with Kestrel's default 100, so that a client with more
    /// concurrent gRPC streams spreads them over several connections as it does to a replica.
    /// </summary>
    public static async Task<WebApplication> StartAsync(int httpPort, int grpcPort, string? redis, ServiceRegistration? staticReplica, bool productHost, int? h2StreamsPerConnection = null)
    {
        WebApplicationBuilder builder;
        if (productHost)
        {
            var settings = Path.Combine(AppContext.BaseDirectory, "appsettings.json");
            if (!File.Exists(settings))
            {
                throw new FileNotFoundException($"the gateway's appsettings.json is not next to the bench ({settings}); the gateway project reference copies it");
            }
            builder = WebApplication.CreateBuilder(new WebApplicationOptions { ContentRootPath = AppContext.BaseDirectory });
        }
        else
        {
            builder = WebApplication.CreateBuilder();
            builder.Logging.ClearProviders();
        }
        builder.Configuration.AddInMemoryCollection(new Dictionary<string, string?>
        {
            ["Kestrel:Endpoints:Http:Url"] = $"http://127.0.0.1:{httpPort}",
            ["Kestrel:Endpoints:Http:Protocols"] = "Http1",
            ["Kestrel:Endpoints:Grpc:Url"] = $"http://127.0.0.1:{grpcPort}",
            ["Kestrel:Endpoints:Grpc:Protocols"] = "Http2",
            ["Redis:Configuration"] = redis ?? NoRedis,
            ["Redis:Prefix"] = "bench",
            ["Gateway:ApiKeys:0:Name"] = "bench",
            ["Gateway:ApiKeys:0:Key"] = Key,
            ["Gateway:RateLimit:RequestsPerSecond"] = "0",
            ["Gateway:RateLimit:MaxConcurrentRequests"] = "0",
        });
        builder.AddGateway();
        if (h2StreamsPerConnection is { } streams)
        {
            // Registered after AddGateway's own Configure, so it runs last.
            builder.Services.Configure<Microsoft.AspNetCore.Server.Kestrel.Core.KestrelServerOptions>(k => k.Limits.Http2.MaxStreamsPerConnection = streams);
        }
        var app = builder.Build();
        app.MapGateway();
        await app.StartAsync();
        if (staticReplica is not null)
        {
            var fleet = app.Services.GetRequiredService<FleetView>();
            fleet.SetReplicas(new Dictionary<string, ServiceRegistration>(StringComparer.Ordinal) { [staticReplica.Id] = staticReplica });
            fleet.UpdateMetrics(StubReplica.MetricsFor(staticReplica.Id));
            app.Services.GetRequiredService<FleetProxyConfigProvider>().Update([staticReplica]);
            _ = FeedMetricsAsync(fleet, staticReplica.Id, app.Lifetime.ApplicationStopping);
        }
        return app;
    }

    /// <summary>What a replica would publish each second, so routing uses fresh metrics as it does with Redis.</summary>
    private static async Task FeedMetricsAsync(FleetView fleet, string id, CancellationToken stopping)
    {
        using var timer = new PeriodicTimer(TimeSpan.FromSeconds(1));
        try
        {
            while (await timer.WaitForNextTickAsync(stopping))
            {
                fleet.UpdateMetrics(StubReplica.MetricsFor(id));
            }
        }
        catch (OperationCanceledException)
        {
            // Stopping.
        }
    }
}

/// <summary>
/// The bench's own process roles: <c>--role replica</c> and <c>--role gateway</c> (started by the client with
/// <c>--processes</c>), and the supervisor that re-runs the bench on <c>--client-cpus</c>.
/// </summary>
public static class BenchRoles
{
    /// <summary>Set in the environment of a bench started on its client CPUs by the supervisor.</summary>
    public const string PinnedVariable = "DSLAMESH_BENCH_PINNED";

    /// <summary>The supervisor's own CPUs, where the pinned bench starts children that were given no CPU list.</summary>
    public const string UnpinnedCpusVariable = "DSLAMESH_BENCH_UNPINNED_CPUS";

    /// <summary>The stub replica alone: <c>--http-port N --grpc-port N --chunks N --token-interval-ms X [--redis HOST:PORT]</c>.</summary>
    public static async Task<int> ReplicaAsync(string[] args)
    {
        var redis = GatewayBench.Arg(args, "--redis", "");
        await using var stub = await StubReplica.StartAsync(redis.Length > 0 ? redis : null, "bench", IntArg(args, "--http-port"), IntArg(args, "--grpc-port"), IntArg(args, "--chunks"),
            TimeSpan.FromMilliseconds(double.Parse(GatewayBench.Arg(args, "--token-interval-ms", "0"), CultureInfo.InvariantCulture)));
        Console.WriteLine($"replica ready: {stub.Registration.Address}, {stub.Registration.GrpcAddress}, {Environment.ProcessorCount} cores");
        await UntilStoppedAsync();
        return 0;
    }

    /// <summary>
    /// The gateway alone: <c>--http-port N --grpc-port N (--redis HOST:PORT | --replica-http-port N --replica-grpc-port N)
    /// [--gateway-logging product|off] [--gateway-h2-streams N]</c>.
    /// </summary>
    public static async Task<int> GatewayAsync(string[] args)
    {
        var redis = GatewayBench.Arg(args, "--redis", "");
        var replica = redis.Length > 0 ? null : StubReplica.RegistrationFor(IntArg(args, "--replica-http-port"), IntArg(args, "--replica-grpc-port"));
        var app = await BenchGateway.StartAsync(IntArg(args, "--http-port"), IntArg(args, "--grpc-port"), redis.Length > 0 ? redis : null, replica,
            productHost: GatewayBench.Arg(args, "--gateway-logging", "product") == "product",
            h2StreamsPerConnection: GatewayBench.Arg(args, "--gateway-h2-streams", "") is { Length: > 0 } streams ? int.Parse(streams, CultureInfo.InvariantCulture) : null);
        await using (app)
        {
            Console.WriteLine($"gateway started, {Environment.ProcessorCount} cores");
            await Task.WhenAny(UntilStoppedAsync(), Task.Delay(Timeout.Infinite, app.Lifetime.ApplicationStopping));
            await app.StopAsync();
        }
        return 0;
    }

    /// <summary>
    /// Runs this bench again, with the same arguments, on <paramref name="cpus"/> from its first instruction, and
    /// returns its exit code. SIGINT and SIGTERM are passed on (the pinned bench stops its own children).
    /// </summary>
    public static async Task<int> SuperviseAsync(string[] args, CpuSet cpus)
    {
        var start = ChildProcess.SelfStartInfo(args);
        start.RedirectStandardOutput = false;
        start.RedirectStandardError = false;
        start.Environment[PinnedVariable] = "1";
        start.Environment[UnpinnedCpusVariable] = Affinity.Current().ToString();
        using var client = Affinity.Start(start, cpus);
        void Forward(PosixSignalContext context)
        {
            context.Cancel = true;
            Affinity.Signal(client.Id, context.Signal);
        }
        using var interrupt = PosixSignalRegistration.Create(PosixSignal.SIGINT, Forward);
        using var terminate = PosixSignalRegistration.Create(PosixSignal.SIGTERM, Forward);
        await client.WaitForExitAsync();
        return client.ExitCode;
    }

    /// <summary>Until standard input ends (the bench closed it, or died) or SIGINT/SIGTERM arrives.</summary>
    private static async Task UntilStoppedAsync()
    {
        var stopped = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        void Stop(PosixSignalContext context)
        {
            context.Cancel = true;
            stopped.TrySetResult();
        }
        using var interrupt = PosixSignalRegistration.Create(PosixSignal.SIGINT, Stop);
        using var terminate = PosixSignalRegistration.Create(PosixSignal.SIGTERM, Stop);
        _ = Task.Run(async () =>
        {
            try
            {
                await using var input = Console.OpenStandardInput();
                var buffer = new byte[256];
                while (await input.ReadAsync(buffer) > 0)
                {
                }
            }
            catch (IOException)
            {
                // Closed.
            }
            stopped.TrySetResult();
        });
        await stopped.Task;
    }

    private static int IntArg(string[] args, string name)
    {
        var text = GatewayBench.Arg(args, name, "");
        return int.TryParse(text, NumberStyles.None, CultureInfo.InvariantCulture, out var value) ? value : throw new ArgumentException($"{name} N is required");
    }

    /// <summary>Whether a program is on PATH.</summary>
    public static bool OnPath(string program) =>
        (Environment.GetEnvironmentVariable("PATH") ?? "").Split(Path.PathSeparator, StringSplitOptions.RemoveEmptyEntries)
            .Any(dir => File.Exists(Path.Combine(dir, program)));
}

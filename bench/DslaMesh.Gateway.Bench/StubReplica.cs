using System.Diagnostics;
using System.Globalization;
using System.Text;
using System.Text.Json;
using DslaMesh.Fleet;
using DslaMesh.Protos.V1;
using Grpc.Core;
using StackExchange.Redis;

namespace DslaMesh.Gateway.Bench;

/// <summary>
/// A replica without a model: SSE and gRPC streams of a fixed number of token-sized chunks, either all at once or one
/// per token interval, /health, and a registration plus metrics in Redis like a model service. Each chunk's text is the
/// Stopwatch timestamp of its write (<c>" t123…"</c>), so the client measures its delivery time. With no model time in
/// the way, what remains of a request's latency is HTTP, the proxy and the client. Without Redis (the <c>static</c>
/// registry) it only serves, and the gateway is given its address instead.
/// </summary>
public sealed class StubReplica : IAsyncDisposable
{
    private readonly WebApplication _app;
    private readonly ConnectionMultiplexer? _redis;
    private readonly CancellationTokenSource _stop = new();
    private readonly Task _publisher;

    private StubReplica(WebApplication app, ConnectionMultiplexer? redis, string prefix, ServiceRegistration registration)
    {
        _app = app;
        _redis = redis;
        Registration = registration;
        _publisher = redis is null ? Task.CompletedTask : PublishAsync(redis, prefix, _stop.Token);
    }

    public ServiceRegistration Registration { get; }

    /// <summary>The registration a stub on these ports publishes (and the one a static gateway is given).</summary>
    public static ServiceRegistration RegistrationFor(int httpPort, int grpcPort) =>
        new($"stub-{httpPort}", $"http://localhost:{httpPort}", $"http://localhost:{grpcPort}", "stub", 32, [], "none", 4096, 256, 1024, 1L << 30, DateTimeOffset.UtcNow);

    /// <summary>The metrics a stub publishes every second: idle, nothing converted.</summary>
    public static ServiceMetricsRecord MetricsFor(string id) =>
        new(id, DateTimeOffset.UtcNow, 0, 0, new Dictionary<string, int>(), 0, 0, 1L << 30, 0, 0, 0, 0, [], 32, 0, false);

    /// <summary>Starts the stub; with <paramref name="redis"/> null it neither registers nor publishes metrics.</summary>
    public static async Task<StubReplica> StartAsync(string? redis, string prefix, int httpPort, int grpcPort, int chunks, TimeSpan interval)
    {
        var builder = WebApplication.CreateSlimBuilder();
        builder.Logging.ClearProviders();
        builder.WebHost.ConfigureKestrel(k =>
        {
            k.ListenLocalhost(httpPort, o => o.Protocols = Microsoft.AspNetCore.Server.Kestrel.Core.HttpProtocols.Http1);
            k.ListenLocalhost(grpcPort, o => o.Protocols = Microsoft.AspNetCore.Server.Kestrel.Core.HttpProtocols.Http2);
        });
        builder.Services.AddGrpc();
        builder.Services.AddSingleton(new StubGeneration(chunks, interval));
        var app = builder.Build();
        app.MapPost("/v1/completions", async (HttpContext context) =>
        {
            await context.Request.Body.CopyToAsync(Stream.Null, context.RequestAborted);
            context.Response.ContentType = "text/event-stream";
            await context.Response.StartAsync(context.RequestAborted);
            for (var i = 0; i < chunks; i++)
            {
                await StubGeneration.PaceAsync(i, interval, context.RequestAborted);
                var finish = i == chunks - 1 ? "\"length\"" : "null";
                var payload = Encoding.UTF8.GetBytes(
                    $"data: {{\"id\":\"cmpl-bench\",\"object\":\"text_completion\",\"created\":0,\"model\":\"stub\",\"choices\":[{{\"index\":0,\"text\":\"{StubGeneration.Stamp()}\",\"logprobs\":null,\"finish_reason\":{finish}}}]}}\n\n");
                await context.Response.Body.WriteAsync(payload, context.RequestAborted);
                await context.Response.Body.FlushAsync(context.RequestAborted);
            }
            await context.Response.Body.WriteAsync("data: [DONE]\n\n"u8.ToArray(), context.RequestAborted);
        });
        app.MapGet("/health", () => "Healthy");
        app.MapGrpcService<StubGeneration>();
        await app.StartAsync();
        var multiplexer = redis is null ? null : await ConnectionMultiplexer.ConnectAsync(redis);
        return new StubReplica(app, multiplexer, prefix, RegistrationFor(httpPort, grpcPort));
    }

    private async Task PublishAsync(ConnectionMultiplexer redis, string prefix, CancellationToken cancellationToken)
    {
        var db = redis.GetDatabase();
        using var timer = new PeriodicTimer(TimeSpan.FromSeconds(1));
        do
        {
            var metrics = JsonSerializer.Serialize(MetricsFor(Registration.Id), FleetJsonContext.Default.ServiceMetricsRecord);
            await db.StringSetAsync(FleetKeys.Service(prefix, Registration.Id), JsonSerializer.Serialize(Registration, FleetJsonContext.Default.ServiceRegistration), TimeSpan.FromSeconds(5));
            await db.SetAddAsync(FleetKeys.Services(prefix), Registration.Id);
            await db.StringSetAsync(FleetKeys.Metrics(prefix, Registration.Id), metrics, TimeSpan.FromSeconds(5));
            await db.PublishAsync(RedisChannel.Literal(FleetKeys.MetricsChannel(prefix)), metrics);
        }
        while (await timer.WaitForNextTickAsync(cancellationToken).ConfigureAwait(false));
    }

    public async ValueTask DisposeAsync()
    {
        await _stop.CancelAsync();
        try
        {
            await _publisher;
        }
        catch (OperationCanceledException)
        {
            // Stopped.
        }
        _stop.Dispose();
        await _app.StopAsync();
        await _app.DisposeAsync();
        if (_redis is not null)
        {
            await _redis.DisposeAsync();
        }
    }
}

/// <summary>gRPC Generate that streams a fixed number of one-token messages and a completion.</summary>
public sealed class StubGeneration : Generation.GenerationBase
{
    private readonly int _chunks;
    private readonly TimeSpan _interval;

    public StubGeneration(int chunks, TimeSpan interval)
    {
        _chunks = chunks;
        _interval = interval;
    }

    /// <summary>A chunk's text: the current Stopwatch timestamp, <c>" t123…"</c>.</summary>
    public static string Stamp() => string.Create(CultureInfo.InvariantCulture, $" t{Stopwatch.GetTimestamp()}");

    /// <summary>Waits one token interval before every chunk but the first.</summary>
    public static Task PaceAsync(int chunk, TimeSpan interval, CancellationToken cancellationToken) =>
        chunk > 0 && interval > TimeSpan.Zero ? Task.Delay(interval, cancellationToken) : Task.CompletedTask;

    /// <inheritdoc/>
    public override async Task Generate(GenerateRequest request, IServerStreamWriter<GenerateResponse> responseStream, ServerCallContext context)
    {
        for (var i = 0; i < _chunks - 1; i++)
        {
            await PaceAsync(i, _interval, context.CancellationToken);
            var message = new GenerateResponse { Text = Stamp() };
            message.TokenIds.Add(i);
            await responseStream.WriteAsync(message, context.CancellationToken);
        }
        await responseStream.WriteAsync(new GenerateResponse { Completion = new Completion { FinishReason = "length" } }, context.CancellationToken);
    }
}

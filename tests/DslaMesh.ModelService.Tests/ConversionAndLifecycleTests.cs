using System.Net;
using System.Net.Http.Json;
using System.Text.Json;
using DslaMesh.Engine.Inference;
using DslaMesh.Fleet;
using DslaMesh.Protos.V1;
using DslaMesh.Tests.Common;
using Grpc.Core;
using Grpc.Health.V1;
using Microsoft.Extensions.DependencyInjection;
using StackExchange.Redis;

namespace DslaMesh.ModelService.Tests;

/// <summary>Live conversion over the control stream, cancellation, backpressure, Redis registration and draining.</summary>
public sealed class ConversionAndLifecycleTests : IClassFixture<ServiceFixture>
{
    private readonly ServiceFixture _fixture;

    public ConversionAndLifecycleTests(ServiceFixture fixture) => _fixture = fixture;

    [Fact]
    public async Task Conversion_over_the_control_stream_loses_none_of_eight_streams()
    {
        await using var service = await ModelServiceHost.StartAsync(_fixture.ModelPath, null);
        var ct = TestContext.Current.CancellationToken;
        var prompts = Enumerable.Range(0, 8).Select(i => Enumerable.Range(20 + (5 * i), 3 + i).ToArray()).ToArray();
        var started = prompts.Select(_ => new TaskCompletionSource()).ToArray();
        var streams = prompts.Select((p, i) => Stream(service, p, started[i], ct, maxTokens: 150)).ToArray();
        await Task.WhenAll(started.Select(s => s.Task)).WaitAsync(TimeSpan.FromSeconds(30), ct);

        using var control = service.Control.Control(cancellationToken: ct);
        await control.RequestStream.WriteAsync(Command(1, (1, LayerKind.Dsla)), ct);
        Assert.True(await control.ResponseStream.MoveNext(ct));
        var applied = control.ResponseStream.Current;
        Assert.True(applied.Accepted, applied.Reason);
        Assert.Equal([1], applied.DslaLayers);

        var results = await Task.WhenAll(streams);
        for (var i = 0; i < prompts.Length; i++)
        {
            var (tokens, completion) = results[i];
            Assert.Equal("length", completion.FinishReason);
            // The receipt says where layer 1 was folded; the tokens must equal the engine alone folding there.
            var fold = Assert.Single(completion.Receipt.Switches, s => s.Layer == 1).Position;
            Assert.Contains(1, completion.Receipt.DecodeDslaLayers);
            Assert.Equal(_fixture.Reference(prompts[i], SamplingParameters.Greedy(150) with { IgnoreEos = true }, 1, fold), tokens);
        }

        // A stale epoch is rejected and the state stays.
        await control.RequestStream.WriteAsync(Command(0, (1, LayerKind.Attention)), ct);
        Assert.True(await control.ResponseStream.MoveNext(ct));
        Assert.False(control.ResponseStream.Current.Accepted);
        Assert.Contains("stale epoch", control.ResponseStream.Current.Reason);
        Assert.Equal([1], control.ResponseStream.Current.DslaLayers);
        await control.RequestStream.CompleteAsync();
        var state = await service.Control.GetStateAsync(new GetStateRequest(), cancellationToken: ct);
        Assert.Equal(1, state.Epoch);
    }

    [Fact]
    public async Task Cancelled_grpc_call_frees_its_memory_and_full_queue_answers_429_and_resource_exhausted()
    {
        await using var service = await ModelServiceHost.StartAsync(_fixture.ModelPath, null, new Dictionary<string, string?>
        {
            ["ModelService:Engine:MaxBatchSize"] = "1",
            ["ModelService:Engine:MaxQueuedRequests"] = "0",
        });
        var ct = TestContext.Current.CancellationToken;
        using var cancel = CancellationTokenSource.CreateLinkedTokenSource(ct);
        var started = new TaskCompletionSource();
        var running = Stream(service, [5, 6, 7], started, cancel.Token, maxTokens: 200);
        await started.Task.WaitAsync(TimeSpan.FromSeconds(30), ct);
        Assert.True(service.Model.Engine!.Snapshot.KvBytesUsed > 0);

        var http = await service.Http.PostAsJsonAsync("/v1/completions", new { prompt = new[] { 5, 6 }, max_tokens = 4 }, ct);
        Assert.Equal(HttpStatusCode.TooManyRequests, http.StatusCode);
        Assert.NotNull(http.Headers.RetryAfter);
        var grpc = await Assert.ThrowsAsync<RpcException>(() => Stream(service, [5, 6], new TaskCompletionSource(), ct));
        Assert.Equal(StatusCode.ResourceExhausted, grpc.StatusCode);

        await cancel.CancelAsync();
        await Assert.ThrowsAnyAsync<Exception>(() => running);
        await WaitUntil(() => service.Model.Engine!.Snapshot is { Running: 0, KvBytesUsed: 0 }, ct);
        var ok = await service.Http.PostAsJsonAsync("/v1/completions", new { prompt = new[] { 5, 6 }, max_tokens = 4 }, ct);
        Assert.Equal(HttpStatusCode.OK, ok.StatusCode);
    }

    [Fact]
    public async Task Registration_and_metrics_appear_in_redis_and_disappear_after_drain()
    {
        var ct = TestContext.Current.CancellationToken;
        await using var redis = await ConnectionMultiplexer.ConnectAsync(_fixture.Redis.Configuration);
        var db = redis.GetDatabase();
        var service = await ModelServiceHost.StartAsync(_fixture.ModelPath, _fixture.Redis.Configuration);
        var id = service.Services.GetRequiredService<DslaMesh.ModelService.Hosting.ServiceIdentity>().Id;
        await WaitUntil(() => db.KeyExists(FleetKeys.Service("dslamesh", id)) && db.KeyExists(FleetKeys.Metrics("dslamesh", id)), ct);
        var registration = JsonSerializer.Deserialize(db.StringGet(FleetKeys.Service("dslamesh", id)).ToString(), FleetJsonContext.Default.ServiceRegistration)!;
        Assert.Equal(2, registration.LayerCount);
        Assert.Equal([1, 0], registration.SensitivityOrder);
        Assert.Equal("dsla-foldable", registration.Variant);
        Assert.Equal(service.GrpcAddress.ToString().TrimEnd('/'), registration.GrpcAddress.TrimEnd('/'));
        Assert.True(db.SetContains(FleetKeys.Services("dslamesh"), id));

        // A running stream survives the drain; new requests are refused while it runs; health says 503.
        var started = new TaskCompletionSource();
        var running = Stream(service, [5, 6, 7], started, ct, maxTokens: 240);
        await started.Task.WaitAsync(TimeSpan.FromSeconds(30), ct);
        var metrics = await service.Http.GetStringAsync("/metrics", ct);
        Assert.Contains("num_requests_running 1", metrics);
        Assert.Contains("time_to_first_token_seconds_bucket", metrics);
        Assert.Contains("dsla_layers_converted", metrics);
        var stopping = service.StopAsync();
        await WaitUntil(() => service.Model.Engine?.IsDraining == true, ct);
        var health = await service.Http.GetAsync("/health", ct);
        Assert.Equal(HttpStatusCode.ServiceUnavailable, health.StatusCode);
        var (tokens, completion) = await running;
        Assert.Equal(240, tokens.Count);
        Assert.Equal("length", completion.FinishReason);
        await stopping;
        Assert.False(db.KeyExists(FleetKeys.Service("dslamesh", id)));
        Assert.False(db.SetContains(FleetKeys.Services("dslamesh"), id));
        await service.DisposeAsync();
    }

    [Fact]
    public async Task Service_keeps_serving_while_redis_is_down_and_republishes_when_it_returns()
    {
        var ct = TestContext.Current.CancellationToken;
        await using var redisServer = await RedisServer.StartAsync(cancellationToken: ct);
        await using var service = await ModelServiceHost.StartAsync(_fixture.ModelPath, redisServer.Configuration);
        var id = service.Services.GetRequiredService<DslaMesh.ModelService.Hosting.ServiceIdentity>().Id;
        await redisServer.StopAsync();
        var response = await service.Http.PostAsJsonAsync("/v1/completions", new { prompt = new[] { 5, 6 }, max_tokens = 4 }, ct);
        Assert.Equal(HttpStatusCode.OK, response.StatusCode);
        await redisServer.RestartAsync(ct);
        await using var redis = await ConnectionMultiplexer.ConnectAsync(redisServer.Configuration);
        await WaitUntil(() => redis.GetDatabase().KeyExists(FleetKeys.Service("dslamesh", id)), ct, seconds: 20);
    }

    [Fact]
    public async Task Grpc_health_reports_serving()
    {
        await using var service = await ModelServiceHost.StartAsync(_fixture.ModelPath, null);
        var health = new Health.HealthClient(service.Channel);
        var reply = await health.CheckAsync(new HealthCheckRequest(), cancellationToken: TestContext.Current.CancellationToken);
        Assert.Equal(HealthCheckResponse.Types.ServingStatus.Serving, reply.Status);
    }

    private static ConversionCommand Command(long epoch, params (int Layer, LayerKind Kind)[] layers)
    {
        var command = new ConversionCommand { Epoch = epoch, Issuer = "test" };
        command.Layers.Add(layers.Select(l => new LayerTarget { Layer = l.Layer, Kind = l.Kind }));
        return command;
    }

    private static async Task<(List<int> Tokens, Completion Completion)> Stream(ModelServiceHost service, int[] prompt, TaskCompletionSource afterThree, CancellationToken ct, int maxTokens = 30)
    {
        var request = new GenerateRequest { TokenIds = new TokenIds(), Sampling = new SamplingParams { Temperature = 0, MaxTokens = maxTokens, IgnoreEos = true } };
        request.TokenIds.Ids.Add(prompt);
        using var call = service.Generation.Generate(request, cancellationToken: ct);
        var tokens = new List<int>();
        await foreach (var message in call.ResponseStream.ReadAllAsync(ct))
        {
            tokens.AddRange(message.TokenIds);
            if (tokens.Count >= 3)
            {
                afterThree.TrySetResult();
            }
            if (message.Completion is { } completion)
            {
                return (tokens, completion);
            }
        }
        throw new InvalidOperationException("no completion message");
    }

    private static async Task WaitUntil(Func<bool> condition, CancellationToken ct, int seconds = 10)
    {
        var deadline = DateTime.UtcNow.AddSeconds(seconds);
        while (!condition())
        {
            Assert.True(DateTime.UtcNow < deadline, $"condition not reached within {seconds} s");
            await Task.Delay(20, ct);
        }
    }
}

using System.Net;
using System.Net.Http.Json;
using DslaMesh.Tests.Common;
using Grpc.Core;

namespace DslaMesh.Gateway.Tests;

/// <summary>A replica dies with streams in flight: those streams end with retryable errors, new requests go elsewhere.</summary>
public sealed class FailoverTests
{
    private const int LongTokens = 4000;

    [Fact]
    public async Task Killed_replica_ends_its_streams_with_retryable_errors_and_new_requests_go_to_the_other()
    {
        var ct = TestContext.Current.CancellationToken;
        await using var redis = await RedisServer.StartAsync(cancellationToken: ct);
        // Streams of 4000 tokens: long enough to be cut off by the kill however fast the replica decodes.
        var model = ModelServiceProcess.LongContextModel();
        using var cleanup = new DeleteOnDispose(model);
        var starting = new[] { "survivor", "victim" }.Select(id => ModelServiceProcess.StartAsync(id, redis.Configuration, "failover", modelPath: model, cancellationToken: ct)).ToArray();
        await using var survivor = await starting[0];
        await using var victim = await starting[1];
        await using var gateway = await GatewayHost.StartAsync(redis.Configuration, "failover");
        await gateway.WaitForReplicasAsync([survivor.Id, victim.Id], ct);

        // Open long streams one after another (the policy spreads them) until both protocols have one on the victim.
        var sse = new List<(Task<SseResult> Result, string? Replica)>();
        var grpc = new List<(Task<GrpcResult> Result, string? Replica)>();
        for (var i = 0; i < 12 && !(sse.Any(s => s.Replica == victim.Id) && grpc.Any(g => g.Replica == victim.Id)); i++)
        {
            var first = new TaskCompletionSource<string?>(TaskCreationOptions.RunContinuationsAsynchronously);
            if (i % 2 == 0)
            {
                var result = Clients.SseAsync(gateway.Http, new { prompt = new[] { 5, 6, 7 }, max_tokens = LongTokens, temperature = 0, ignore_eos = true, stream = true }, ct, first);
                sse.Add((result, await first.Task.WaitAsync(TimeSpan.FromSeconds(30), ct)));
            }
            else
            {
                var result = Clients.GrpcAsync(gateway.Generation, Clients.Request(LongTokens), GatewayHost.WithKey(ct), first);
                grpc.Add((result, await first.Task.WaitAsync(TimeSpan.FromSeconds(30), ct)));
            }
        }
        Assert.Contains(sse, s => s.Replica == victim.Id);
        Assert.Contains(grpc, g => g.Replica == victim.Id);

        await victim.KillAsync();

        foreach (var (task, replica) in sse)
        {
            var result = await task.WaitAsync(TimeSpan.FromSeconds(60), ct);
            if (replica == victim.Id && result.FinishReason is null)
            {
                // Cut off: an OpenAI error event, then [DONE], never a bare connection reset.
                Assert.True(result.Error.HasValue, "the broken SSE stream did not end with an error event");
                Assert.Equal("service_unavailable", result.Error.Value.GetProperty("type").GetString());
                Assert.Equal("replica_failed", result.Error.Value.GetProperty("code").GetString());
                Assert.True(result.Done);
            }
            else
            {
                Assert.Null(result.Error);
                Assert.Equal("length", result.FinishReason);
            }
        }
        foreach (var (task, replica) in grpc)
        {
            var result = await task.WaitAsync(TimeSpan.FromSeconds(60), ct);
            if (replica == victim.Id && result.Completion is null)
            {
                Assert.Equal(StatusCode.Unavailable, result.Error?.StatusCode);
                Assert.Contains("victim", result.Error!.Status.Detail);
            }
            else
            {
                Assert.Null(result.Error);
                Assert.Equal(LongTokens, result.Tokens.Count);
            }
        }
        Assert.True(sse.Any(s => s.Replica == victim.Id && s.Result.Result.Error.HasValue) || grpc.Any(g => g.Replica == victim.Id && g.Result.Result.Error is not null),
            "every stream on the victim finished before the kill; nothing was tested");

        // New requests, both protocols, all answered by the survivor (never a 5xx) while the victim is still registered.
        for (var i = 0; i < 6; i++)
        {
            var response = await gateway.Http.PostAsJsonAsync("/v1/completions", new { prompt = new[] { 5, 6 }, max_tokens = 2 }, ct);
            Assert.Equal(HttpStatusCode.OK, response.StatusCode);
            Assert.Equal(survivor.Id, response.Headers.GetValues("x-dslamesh-replica").Single());
            var call = await Clients.GrpcAsync(gateway.Generation, Clients.Request(2), GatewayHost.WithKey(ct));
            Assert.Null(call.Error);
            Assert.Equal(survivor.Id, call.Replica);
        }
    }

    [Fact]
    public async Task Connect_failure_is_retried_on_another_replica_and_an_empty_fleet_answers_503()
    {
        var ct = TestContext.Current.CancellationToken;
        await using var redis = await RedisServer.StartAsync(cancellationToken: ct);
        await using var survivor = await ModelServiceProcess.StartAsync("only", redis.Configuration, "retry", cancellationToken: ct);
        // A registration whose process is gone (ports that refuse connections), as after a crash before its TTL ran out.
        await using var multiplexer = await StackExchange.Redis.ConnectionMultiplexer.ConnectAsync(redis.Configuration);
        var db = multiplexer.GetDatabase();
        var ghost = new DslaMesh.Fleet.ServiceRegistration("ghost", $"http://127.0.0.1:{RedisServer.FreePort()}", $"http://127.0.0.1:{RedisServer.FreePort()}", "llama-gqa-untied",
            2, [1, 0], "none", 256, 32, 64, 0, DateTimeOffset.UtcNow);
        await db.StringSetAsync(DslaMesh.Fleet.FleetKeys.Service("retry", "ghost"), System.Text.Json.JsonSerializer.Serialize(ghost, DslaMesh.Fleet.FleetJsonContext.Default.ServiceRegistration));
        await db.SetAddAsync(DslaMesh.Fleet.FleetKeys.Services("retry"), "ghost");
        await using var gateway = await GatewayHost.StartAsync(redis.Configuration, "retry", new Dictionary<string, string?> { ["Gateway:Health:ActiveInterval"] = "00:01:00" });
        await gateway.WaitForReplicasAsync(["only", "ghost"], ct);

        for (var i = 0; i < 4; i++)
        {
            var response = await gateway.Http.PostAsJsonAsync("/v1/completions", new { prompt = new[] { 5, 6 }, max_tokens = 2 }, ct);
            Assert.Equal(HttpStatusCode.OK, response.StatusCode);
            Assert.Equal("only", response.Headers.GetValues("x-dslamesh-replica").Single());
        }

        await survivor.StopAsync();
        await db.KeyDeleteAsync(DslaMesh.Fleet.FleetKeys.Service("retry", "ghost"));
        await gateway.WaitForReplicasAsync([], ct);
        var none = await gateway.Http.PostAsJsonAsync("/v1/completions", new { prompt = new[] { 5, 6 }, max_tokens = 2 }, ct);
        Assert.Equal(HttpStatusCode.ServiceUnavailable, none.StatusCode);
        Assert.NotNull(none.Headers.RetryAfter);
        Assert.Equal("service_unavailable", (await none.Content.ReadFromJsonAsync<System.Text.Json.JsonElement>(ct)).GetProperty("error").GetProperty("type").GetString());
        var grpc = await Clients.GrpcAsync(gateway.Generation, Clients.Request(2), GatewayHost.WithKey(ct));
        Assert.Equal(StatusCode.Unavailable, grpc.Error?.StatusCode);
    }

    [Fact]
    public async Task Draining_replica_finishes_its_stream_while_new_requests_go_to_the_other()
    {
        var ct = TestContext.Current.CancellationToken;
        await using var redis = await RedisServer.StartAsync(cancellationToken: ct);
        var starting = new[] { "staying", "leaving" }.Select(id => ModelServiceProcess.StartAsync(id, redis.Configuration, "drain", cancellationToken: ct)).ToArray();
        await using var staying = await starting[0];
        await using var leaving = await starting[1];
        // Probes too slow to matter: what keeps clients whole here is retrying the 503/UNAVAILABLE of a draining replica.
        await using var gateway = await GatewayHost.StartAsync(redis.Configuration, "drain", new Dictionary<string, string?> { ["Gateway:Health:ActiveInterval"] = "00:01:00" });
        await gateway.WaitForReplicasAsync([staying.Id, leaving.Id], ct);

        Task<SseResult>? onLeaving = null;
        for (var i = 0; i < 8 && onLeaving is null; i++)
        {
            var first = new TaskCompletionSource<string?>(TaskCreationOptions.RunContinuationsAsynchronously);
            var stream = Clients.SseAsync(gateway.Http, new { prompt = new[] { 5, 6, 7 }, max_tokens = 250, temperature = 0, ignore_eos = true, stream = true }, ct, first);
            onLeaving = await first.Task.WaitAsync(TimeSpan.FromSeconds(30), ct) == leaving.Id ? stream : null;
        }
        Assert.NotNull(onLeaving);

        var stopping = leaving.StopAsync();
        // Once it drains (503 on /health and on new requests), nothing new may land there.
        using (var probe = new HttpClient { BaseAddress = leaving.Address, Timeout = TimeSpan.FromSeconds(2) })
        {
            while (true)
            {
                try
                {
                    if ((await probe.GetAsync("/health", ct)).StatusCode == HttpStatusCode.ServiceUnavailable)
                    {
                        break;
                    }
                }
                catch (HttpRequestException)
                {
                    break;   // already gone
                }
                await Task.Delay(5, ct);
            }
        }
        for (var i = 0; i < 6; i++)
        {
            var response = await gateway.Http.PostAsJsonAsync("/v1/completions", new { prompt = new[] { 5, 6 }, max_tokens = 2 }, ct);
            Assert.Equal(HttpStatusCode.OK, response.StatusCode);
            Assert.Equal(staying.Id, response.Headers.GetValues("x-dslamesh-replica").Single());
            var call = await Clients.GrpcAsync(gateway.Generation, Clients.Request(2), GatewayHost.WithKey(ct));
            Assert.Null(call.Error);
            Assert.Equal(staying.Id, call.Replica);
        }
        var drained = await onLeaving.WaitAsync(TimeSpan.FromSeconds(60), ct);
        Assert.Equal("length", drained.FinishReason);
        Assert.Null(drained.Error);
        await stopping;
    }
}

/// <summary>Deletes a temporary folder at the end of a test.</summary>
internal sealed class DeleteOnDispose(string folder) : IDisposable
{
    public void Dispose() => Directory.Delete(folder, recursive: true);
}

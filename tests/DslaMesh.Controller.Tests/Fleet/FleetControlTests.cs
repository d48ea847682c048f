using System.Diagnostics;
using DslaMesh.Controller.Tests.Infrastructure;
using DslaMesh.Protos.V1;
using DslaMesh.Tests.Common;
using Grpc.Core;
using Grpc.Net.Client;

namespace DslaMesh.Controller.Tests.Fleet;

/// <summary>
/// The controller with real Redis and real model services on loopback: policy-driven conversion under a burst, policy
/// changes and rollback through dslactl, restarts of the controller and of Redis, epoch fencing, admin authentication.
/// </summary>
public sealed class FleetControlTests
{
    // Buckets scaled to the tiny model (256-token context): 40-token prompts count as "long" (100% of layers), idle as 0%.
    private const string BurstPolicy = """
        {
          "description": "scaled for tests",
          "max_conversion_rate": [
            { "min_prompt_tokens": 0, "max_dsla_fraction": 0 },
            { "min_prompt_tokens": 16, "max_dsla_fraction": 0.5 },
            { "min_prompt_tokens": 32, "max_dsla_fraction": 1.0 }
          ],
          "triggers": { "queue_depth": null, "kv_usage": null, "prompt_tokens": { "high": 16, "low": 8 } },
          "cooldown_ms": 100,
          "prompt_window_ms": 300,
          "global_max_dsla_fraction": 1.0
        }
        """;

    // Calm whatever the load: nothing converted.
    private const string IdlePolicy = """
        { "max_conversion_rate": [ { "min_prompt_tokens": 0, "max_dsla_fraction": 1.0 } ], "global_max_dsla_fraction": 1.0,
          "triggers": { "queue_depth": { "high": 1000, "low": 0 }, "kv_usage": null }, "step_layers": 2, "cooldown_ms": 0 }
        """;

    // High-water mark 0: convert up to the cap (every layer) whatever the load.
    private const string AlwaysPolicy = """
        { "max_conversion_rate": [ { "min_prompt_tokens": 0, "max_dsla_fraction": 1.0 } ], "global_max_dsla_fraction": 1.0,
          "triggers": { "queue_depth": { "high": 0, "low": 0 }, "kv_usage": null }, "step_layers": 2, "cooldown_ms": 0 }
        """;

    private readonly ModelFixture _model;

    public FleetControlTests(ModelFixture model) => _model = model;

    [Fact]
    public async Task Burst_of_long_prompts_converts_every_service_up_to_the_cap_within_2s_and_reverts_after()
    {
        var ct = TestContext.Current.CancellationToken;
        await using var fleet = await TestFleet.StartAsync(_model.ModelPath, policyJson: BurstPolicy);
        await fleet.WaitForStreamsAsync(fleet.Controller!, ct);
        await fleet.WaitForLayersAsync([], TestFleet.SetupBound, ct);

        using var burst = CancellationTokenSource.CreateLinkedTokenSource(ct);
        var prompt = Enumerable.Range(2, 40).ToArray();
        var clients = fleet.Services.SelectMany(s => Enumerable.Range(0, 3).Select(_ => KeepGenerating(s.Generation, prompt, burst.Token))).ToArray();
        var took = await fleet.WaitForLayersAsync([0, 1], TimeSpan.FromSeconds(2), ct);

        // The cap comes from the scaled MCR bucket of the 40-token prompts (100% of 2 layers).
        var status = await fleet.Controller!.Admin.GetStatusAsync(new GetStatusRequest(), cancellationToken: ct);
        Assert.All(status.Services, s => Assert.Equal(2, s.CapLayers));
        await burst.CancelAsync();
        await Task.WhenAll(clients);
        await fleet.WaitForLayersAsync([], TimeSpan.FromSeconds(3), ct);
        Assert.True(took < TimeSpan.FromSeconds(2), $"converted in {took.TotalSeconds:F2} s");
    }

    [Fact]
    public async Task Policy_set_with_dslactl_takes_effect_on_every_service_within_1s_and_rollback_restores_the_previous_one()
    {
        var ct = TestContext.Current.CancellationToken;
        await using var fleet = await TestFleet.StartAsync(_model.ModelPath);
        var controller = fleet.Controller!;
        await fleet.WaitForStreamsAsync(controller, ct);
        using var files = new TempFiles();

        var (code, output, error) = await TestFleet.Dslactl(["policy", "set", "-f", files.Write("idle.json", IdlePolicy), "-m", "baseline", .. controller.CliArgs]);
        Assert.True(code == 0, error);
        Assert.Equal("policy version 1 is in force", output.Trim());
        await fleet.WaitForLayersAsync([], TimeSpan.FromSeconds(1), ct);

        var always = files.Write("always.json", AlwaysPolicy);
        (code, output, _) = await TestFleet.Dslactl(["policy", "diff", "-f", always, .. controller.CliArgs]);
        Assert.Equal(1, code);
        Assert.Contains("- triggers.queue_depth.high: 1000", output);
        Assert.Contains("+ triggers.queue_depth.high: 0", output);

        var watch = Stopwatch.StartNew();
        (code, _, error) = await TestFleet.Dslactl(["policy", "set", "-f", always, .. controller.CliArgs]);
        Assert.True(code == 0, error);
        await fleet.WaitForLayersAsync([0, 1], TimeSpan.FromSeconds(1) - watch.Elapsed, ct);

        watch.Restart();
        (code, output, error) = await TestFleet.Dslactl(["policy", "rollback", .. controller.CliArgs]);
        Assert.True(code == 0, error);
        Assert.Equal("policy version 3 is in force (rollback to version 1)", output.Trim());
        await fleet.WaitForLayersAsync([], TimeSpan.FromSeconds(1) - watch.Elapsed, ct);

        (code, _, _) = await TestFleet.Dslactl(["policy", "diff", "-f", files.Write("idle2.json", IdlePolicy), .. controller.CliArgs]);
        Assert.Equal(0, code);
        (code, output, _) = await TestFleet.Dslactl(["policy", "history", "--output", "json", .. controller.CliArgs]);
        Assert.Equal(0, code);
        var history = PolicyHistoryReply.Parser.ParseJson(output);
        Assert.Equal([3L, 2L, 1L], history.Versions.Select(v => v.Version));
        Assert.Equal(3, history.CurrentVersion);
        (code, output, _) = await TestFleet.Dslactl(["policy", "rollback", "--to", "2", .. controller.CliArgs]);
        Assert.Equal(0, code);
        Assert.Contains("version 4", output);
        await fleet.WaitForLayersAsync([0, 1], TimeSpan.FromSeconds(1), ct);
        (code, _, error) = await TestFleet.Dslactl(["policy", "rollback", "--to", "42", .. controller.CliArgs]);
        Assert.Equal(6, code);
        Assert.Contains("policy version 42 is not in the history", error);
    }

    [Fact]
    public async Task Malformed_policy_is_refused_with_the_reason_and_the_old_policy_stays()
    {
        var ct = TestContext.Current.CancellationToken;
        await using var fleet = await TestFleet.StartAsync(_model.ModelPath, services: 1, policyJson: IdlePolicy);
        var controller = fleet.Controller!;
        using var files = new TempFiles();
        var bad = files.Write("bad.json", """{ "triggers": { "queue_depth": { "high": 1, "low": 5 } }, "step_layers": 0 }""");

        var (code, _, error) = await TestFleet.Dslactl(["policy", "set", "-f", bad, .. controller.CliArgs]);
        Assert.Equal(2, code);
        Assert.Contains("error: refused: policy rejected: triggers.queue_depth: low (5) must not be above high (1); step_layers: 0 is outside 1..1024", error);
        (code, _, error) = await TestFleet.Dslactl(["policy", "validate", "-f", files.Write("typo.json", """{"cooldown": 5}"""), .. controller.CliArgs]);
        Assert.Equal(2, code);
        Assert.Contains("invalid: $.cooldown: The JSON property 'cooldown'", error);
        (code, _, error) = await TestFleet.Dslactl(["policy", "set", "-f", files.Write("broken.json", "{ \"cooldown_ms\": "), .. controller.CliArgs]);
        Assert.Equal(2, code);
        Assert.Contains("policy rejected: $", error);

        var (getCode, output, _) = await TestFleet.Dslactl(["policy", "get", "--output", "json", .. controller.CliArgs]);
        Assert.Equal(0, getCode);
        var current = PolicyReply.Parser.ParseJson(output);
        Assert.Equal(1, current.Version);
        Assert.Contains("\"high\": 1000", current.PolicyJson);
        Assert.Single((await controller.Admin.GetPolicyHistoryAsync(new GetPolicyHistoryRequest(), cancellationToken: ct)).Versions);
    }

    [Fact]
    public async Task Admin_calls_without_or_with_a_wrong_token_are_unauthenticated()
    {
        var ct = TestContext.Current.CancellationToken;
        await using var fleet = await TestFleet.StartAsync(_model.ModelPath, services: 1);
        var controller = fleet.Controller!;
        using var channel = GrpcChannel.ForAddress(controller.GrpcAddress);
        var anonymous = new ControllerAdmin.ControllerAdminClient(channel);
        var missing = await Assert.ThrowsAsync<RpcException>(() => anonymous.GetPolicyAsync(new GetPolicyRequest(), cancellationToken: ct).ResponseAsync);
        Assert.Equal(StatusCode.Unauthenticated, missing.StatusCode);
        var wrong = await Assert.ThrowsAsync<RpcException>(() => anonymous.SetPolicyAsync(new SetPolicyRequest { PolicyJson = "{}" },
            new Metadata { { "authorization", "Bearer not-the-token" } }, cancellationToken: ct).ResponseAsync);
        Assert.Equal(StatusCode.Unauthenticated, wrong.StatusCode);
        Assert.Equal(0, controller.Policies.Current.Version);

        var (code, _, error) = await TestFleet.Dslactl("status", "--controller", controller.GrpcAddress.ToString(), "--token", "nope-nope-nope-nope");
        Assert.Equal(5, code);
        Assert.Equal("error: unauthenticated: the admin token is not valid", error.Trim());
        // Health needs no token.
        using var http = new HttpClient { BaseAddress = controller.Address };
        Assert.Equal(System.Net.HttpStatusCode.OK, (await http.GetAsync(new Uri("/health", UriKind.Relative), ct)).StatusCode);
    }

    [Fact]
    public async Task Prometheus_metrics_show_leadership_each_services_layers_and_the_decisions_made()
    {
        var ct = TestContext.Current.CancellationToken;
        await using var fleet = await TestFleet.StartAsync(_model.ModelPath, services: 1, policyJson: AlwaysPolicy);
        var service = fleet.Services[0];
        await fleet.WaitForLayersAsync([0, 1], TestFleet.SetupBound, ct);
        using var http = new HttpClient { BaseAddress = fleet.Controller!.Address };
        var policy = fleet.Controller.Policies.Current.Version;
        string text = "";
        var watch = Stopwatch.StartNew();
        // The command answer and the next metrics reading land within a tick or two of the layers changing.
        while (!text.Contains($"dsla_controller_service_dsla_layers{{service=\"{service.Id}\"}} 2", StringComparison.Ordinal)
            || !text.Contains("dsla_controller_commands_total{result=\"accepted\"}", StringComparison.Ordinal))
        {
            Assert.True(watch.Elapsed < TestFleet.SetupBound, text);
            await Task.Delay(50, ct);
            text = await http.GetStringAsync(new Uri("/metrics", UriKind.Relative), ct);
        }
        Assert.Contains("dsla_controller_leader 1", text);
        Assert.Contains("dsla_controller_redis_up 1", text);
        Assert.Contains($"dsla_controller_policy_version {policy}", text);
        Assert.Contains("dsla_controller_services 1", text);
        Assert.Contains($"dsla_controller_service_desired_dsla_layers{{service=\"{service.Id}\"}} 2", text);
        Assert.Contains($"dsla_controller_service_cap_layers{{service=\"{service.Id}\"}} 2", text);
        Assert.Contains($"dsla_controller_service_stream_up{{service=\"{service.Id}\"}} 1", text);
        Assert.Matches("dsla_controller_decisions_total\\{action=\"convert\"\\} [1-9]", text);
    }

    [Fact]
    public async Task Stale_epochs_are_rejected_and_a_standby_controller_cannot_issue_commands()
    {
        var ct = TestContext.Current.CancellationToken;
        await using var fleet = await TestFleet.StartAsync(_model.ModelPath, services: 1, policyJson: AlwaysPolicy);
        var service = fleet.Services[0];
        await fleet.WaitForLayersAsync([0, 1], TestFleet.SetupBound, ct);
        var applied = (await fleet.StatesAsync(ct))[0].Epoch;
        Assert.True(applied > 0);

        // A late message from an older epoch changes nothing.
        using (var late = service.Control.Control(cancellationToken: ct))
        {
            await late.RequestStream.WriteAsync(Command(applied - 1, (0, LayerKind.Attention), (1, LayerKind.Attention)), ct);
            Assert.True(await late.ResponseStream.MoveNext(ct));
            Assert.False(late.ResponseStream.Current.Accepted);
            Assert.Contains("stale epoch", late.ResponseStream.Current.Reason);
            await late.RequestStream.CompleteAsync();
        }
        Assert.Equal([0, 1], (await fleet.StatesAsync(ct))[0].DslaLayers);

        // A second controller stays on standby while the first holds the lease: no epochs, no conversion.
        await using var standby = await fleet.StartControllerAsync();
        await fleet.WaitForStreamsAsync(standby, ct);
        var status = await standby.Admin.GetStatusAsync(new GetStatusRequest(), cancellationToken: ct);
        Assert.False(status.Leader);
        var refused = await Assert.ThrowsAsync<RpcException>(() => standby.Admin.ConvertAsync(
            new ConvertRequest { ServiceId = service.Id, Layers = { 0 }, ToDsla = false }, cancellationToken: ct).ResponseAsync);
        Assert.Equal(StatusCode.FailedPrecondition, refused.StatusCode);
        Assert.Contains("is not the leader", refused.Status.Detail);

        // Manual conversion through the leader (dslactl) uses a new epoch and pins the layer against the policy.
        var (code, output, error) = await TestFleet.Dslactl(["convert", "--service", service.Id, "--layers", "0", "--to", "attention", "--hold", "30", .. fleet.Controller!.CliArgs]);
        Assert.True(code == 0, error);
        Assert.Contains("DSLA layers [1] of 2", output);
        await Task.Delay(300, ct);   // several ticks of a policy that wants every layer converted
        var state = (await fleet.StatesAsync(ct))[0];
        Assert.Equal([1], state.DslaLayers);
        Assert.True(state.Epoch > applied);
    }

    [Fact]
    public async Task Controller_restart_leaves_services_serving_and_the_fleet_converges_back_above_the_last_epoch()
    {
        var ct = TestContext.Current.CancellationToken;
        await using var fleet = await TestFleet.StartAsync(_model.ModelPath, policyJson: AlwaysPolicy);
        await fleet.WaitForLayersAsync([0, 1], TestFleet.SetupBound, ct);
        await fleet.Controller!.DisposeAsync();
        fleet.Controller = null;

        // Without a controller the services serve with their layers; someone reverts one service by hand meanwhile.
        var service = fleet.Services[0];
        var tokens = await Generate(service.Generation, [5, 6, 7], ct);
        Assert.Equal(8, tokens);
        var before = (await fleet.StatesAsync(ct)).Max(s => s.Epoch);
        using (var manual = service.Control.Control(cancellationToken: ct))
        {
            await manual.RequestStream.WriteAsync(Command(before + 5, (0, LayerKind.Attention), (1, LayerKind.Attention)), ct);
            Assert.True(await manual.ResponseStream.MoveNext(ct));
            Assert.True(manual.ResponseStream.Current.Accepted);
            await manual.RequestStream.CompleteAsync();
        }

        // The new controller re-sends the desired state to every service, each with an epoch above anything applied there.
        fleet.Controller = await fleet.StartControllerAsync();
        var watch = Stopwatch.StartNew();
        ConversionState[] states;
        while (!(states = await fleet.StatesAsync(ct)).All(s => s.DslaLayers.Order().SequenceEqual([0, 1]) && s.Epoch > (s.ServiceId == service.Id ? before + 5 : before)))
        {
            Assert.True(watch.Elapsed < TimeSpan.FromSeconds(3), string.Join("; ", states.Select(s => $"{s.ServiceId}: [{string.Join(",", s.DslaLayers)}] at epoch {s.Epoch} (before: {before})")));
            await Task.Delay(20, ct);
        }
    }

    [Fact]
    public async Task Model_service_restart_is_sent_the_desired_state_again_over_the_reconnected_stream()
    {
        var ct = TestContext.Current.CancellationToken;
        await using var fleet = await TestFleet.StartAsync(_model.ModelPath, services: 0, policyJson: AlwaysPolicy);
        var http = RedisServer.FreePort();
        var grpc = RedisServer.FreePort();
        var settings = new Dictionary<string, string?>
        {
            ["Kestrel:Endpoints:Http:Url"] = $"http://127.0.0.1:{http}",
            ["Kestrel:Endpoints:Grpc:Url"] = $"http://127.0.0.1:{grpc}",
            ["ModelService:ServiceId"] = "restarting",
            ["Redis:Prefix"] = fleet.Prefix,
        };
        using var channel = GrpcChannel.ForAddress($"http://127.0.0.1:{grpc}");
        var control = new LayerControl.LayerControlClient(channel);
        async Task WaitForBoth()
        {
            var watch = Stopwatch.StartNew();
            while (true)
            {
                var state = await control.GetStateAsync(new GetStateRequest(), cancellationToken: ct);
                if (state.DslaLayers.Order().SequenceEqual([0, 1]))
                {
                    return;
                }
                Assert.True(watch.Elapsed < TimeSpan.FromSeconds(5), $"the service runs [{string.Join(",", state.DslaLayers)}] at epoch {state.Epoch}");
                await Task.Delay(20, ct);
            }
        }

        var first = await ModelServiceHost.StartAsync(_model.ModelPath, fleet.Redis.Configuration, settings);
        await WaitForBoth();
        await first.DisposeAsync();
        await using var second = await ModelServiceHost.StartAsync(_model.ModelPath, fleet.Redis.Configuration, settings);
        Assert.Empty((await control.GetStateAsync(new GetStateRequest(), cancellationToken: ct)).DslaLayers);   // a fresh engine
        await WaitForBoth();
    }

    [Fact]
    public async Task Redis_restart_leaves_services_serving_and_the_fleet_converges_back()
    {
        var ct = TestContext.Current.CancellationToken;
        await using var fleet = await TestFleet.StartAsync(_model.ModelPath, policyJson: AlwaysPolicy);
        var controller = fleet.Controller!;
        await fleet.WaitForLayersAsync([0, 1], TestFleet.SetupBound, ct);
        var version = controller.Policies.Current.Version;

        await fleet.Redis.StopAsync();
        await WaitUntil(() => !controller.Fleet.RedisHealthy, ct);
        Assert.Equal(8, await Generate(fleet.Services[1].Generation, [9, 10, 11], ct));
        Assert.Equal([0, 1], (await fleet.StatesAsync(ct))[1].DslaLayers);
        // While Redis is down, one service is reverted by hand with a newer epoch.
        var service = fleet.Services[0];
        var before = (await fleet.StatesAsync(ct))[0].Epoch;
        using (var manual = service.Control.Control(cancellationToken: ct))
        {
            await manual.RequestStream.WriteAsync(Command(before + 5, (0, LayerKind.Attention), (1, LayerKind.Attention)), ct);
            Assert.True(await manual.ResponseStream.MoveNext(ct));
            await manual.RequestStream.CompleteAsync();
        }

        // Redis comes back empty: services re-register, the controller writes its policy back and re-asserts the layers.
        await fleet.Redis.RestartAsync(ct);
        await fleet.WaitForLayersAsync([0, 1], TimeSpan.FromSeconds(15), ct);
        Assert.True(controller.Fleet.RedisHealthy);
        Assert.Equal(version, (await controller.Admin.GetPolicyAsync(new GetPolicyRequest(), cancellationToken: ct)).Version);
        Assert.True((await fleet.StatesAsync(ct))[0].Epoch > before + 5);
    }

    [Fact]
    public async Task Dslactl_status_shows_each_layer_and_generate_streams_over_grpc_and_http()
    {
        var ct = TestContext.Current.CancellationToken;
        await using var fleet = await TestFleet.StartAsync(_model.ModelPath, services: 1, policyJson: IdlePolicy);
        var service = fleet.Services[0];
        await fleet.WaitForStreamsAsync(fleet.Controller!, ct);
        var (code, output, error) = await TestFleet.Dslactl(["convert", "-s", service.Id, "-l", "1", "--to", "dsla", .. fleet.Controller!.CliArgs]);
        Assert.True(code == 0, error);
        await WaitUntil(() => fleet.Controller.Fleet.Snapshot()[0].Metrics?.DslaLayers.SequenceEqual([1]) == true, ct);

        (code, output, error) = await TestFleet.Dslactl(["status", .. fleet.Controller.CliArgs]);
        Assert.True(code == 0, error);
        Assert.Contains("policy version 1", output);
        Assert.Contains(service.Id, output);
        Assert.True(output.Contains("AD", StringComparison.Ordinal), output);   // layer 0 attention, layer 1 DSLA
        Assert.Contains("1/2 (cap", output);
        Assert.Contains("up", output);
        (code, output, _) = await TestFleet.Dslactl(["status", "-o", "json", .. fleet.Controller.CliArgs]);
        Assert.Equal(0, code);
        var status = StatusReply.Parser.ParseJson(output);
        Assert.Equal([1], Assert.Single(status.Services).DslaLayers);

        (code, output, error) = await TestFleet.Dslactl("generate", "--endpoint", service.GrpcAddress.ToString(), "--ids", "5,6,7", "-n", "6", "--greedy");
        Assert.True(code == 0, error);
        Assert.Contains("[finish: length; 3 prompt + 6 completion tokens", error);
        Assert.Contains("DSLA layers [1] of 2", error);
        var grpcText = output;
        (code, output, error) = await TestFleet.Dslactl("generate", "--http", service.Address.ToString(), "--ids", "5,6,7", "-n", "6", "--greedy");
        Assert.True(code == 0, error);
        Assert.Contains("[finish: length", error);
        Assert.Equal(grpcText, output);
        (code, _, error) = await TestFleet.Dslactl("generate", "--http", "http://127.0.0.1:1", "--prompt", "hi");
        Assert.Equal(4, code);
        Assert.StartsWith("error: cannot reach", error);
        (code, _, error) = await TestFleet.Dslactl(["convert", "-s", "nope", "-l", "0", "--to", "dsla", .. fleet.Controller.CliArgs]);
        Assert.Equal(6, code);
        Assert.Contains("no model service 'nope'", error);
    }

    private static ConversionCommand Command(long epoch, params (int Layer, LayerKind Kind)[] layers)
    {
        var command = new ConversionCommand { Epoch = epoch, Issuer = "test" };
        command.Layers.Add(layers.Select(l => new LayerTarget { Layer = l.Layer, Kind = l.Kind }));
        return command;
    }

    private static async Task<int> Generate(Generation.GenerationClient client, int[] prompt, CancellationToken ct, int maxTokens = 8)
    {
        var request = new GenerateRequest { TokenIds = new TokenIds(), Sampling = new SamplingParams { Temperature = 0, MaxTokens = maxTokens, IgnoreEos = true } };
        request.TokenIds.Ids.Add(prompt);
        using var call = client.Generate(request, cancellationToken: ct);
        var tokens = 0;
        await foreach (var message in call.ResponseStream.ReadAllAsync(ct))
        {
            tokens += message.TokenIds.Count;
        }
        return tokens;
    }

    /// <summary>Sends long-prompt requests back to back until cancelled.</summary>
    private static async Task KeepGenerating(Generation.GenerationClient client, int[] prompt, CancellationToken ct)
    {
        try
        {
            while (!ct.IsCancellationRequested)
            {
                await Generate(client, prompt, ct, maxTokens: 150);
            }
        }
        catch (RpcException) when (ct.IsCancellationRequested)
        {
            // The burst ended mid-stream (Cancelled, or Unavailable when the abort races the read).
        }
        catch (OperationCanceledException)
        {
        }
    }

    private static async Task WaitUntil(Func<bool> condition, CancellationToken ct, int seconds = 10)
    {
        var watch = Stopwatch.StartNew();
        while (!condition())
        {
            Assert.True(watch.Elapsed < TimeSpan.FromSeconds(seconds), $"condition not reached within {seconds} s");
            await Task.Delay(20, ct);
        }
    }

    private sealed class TempFiles : IDisposable
    {
        private readonly string _folder = Directory.CreateTempSubdirectory("dslamesh-policy-").FullName;

        public string Write(string name, string text)
        {
            var path = Path.Combine(_folder, name);
            File.WriteAllText(path, text);
            return path;
        }

        public void Dispose() => Directory.Delete(_folder, recursive: true);
    }
}

using System.CommandLine;
using System.Text.Json;
using DslaMesh.Cli.Commands;
using DslaMesh.Protos.V1;
using DslaMesh.Tests.Common;

namespace DslaMesh.Cli.Tests.Replay;

/// <summary>
/// <c>dslactl bench replay</c> against a whole mesh on loopback: a real Redis, two model services, the controller and
/// the gateway (all real Kestrel hosts), with a tiny teacher that has foldable DSLA layers.
/// </summary>
public sealed class ReplayBenchTests : IAsyncLifetime
{
    private readonly string _brown = TinyTeachers.SyntheticBrown();
    private readonly string _prefix = "replay" + Guid.NewGuid().ToString("N")[..6];
    private readonly string _out = Directory.CreateTempSubdirectory("dslamesh-replay-").FullName;
    private string _model = "";
    private RedisServer _redis = null!;
    private ModelServiceHost[] _services = [];
    private ControllerHost _controller = null!;
    private GatewayHost _gateway = null!;

    public async ValueTask InitializeAsync()
    {
        _model = TinyTeachers.Create(_brown, layers: 4, context: 256);
        ModelFolders.AddFoldableDsla(_model);
        _redis = await RedisServer.StartAsync();
        _services = await Task.WhenAll(Enumerable.Range(0, 2).Select(_ => ModelServiceHost.StartAsync(_model, _redis.Configuration, new Dictionary<string, string?> { ["Redis:Prefix"] = _prefix })));
        _controller = await ControllerHost.StartAsync(_redis.Configuration, _prefix);
        _gateway = await GatewayHost.StartAsync(_redis.Configuration, _prefix);
        await _gateway.WaitForReplicasAsync([.. _services.Select(s => s.Id)], TestContext.Current.CancellationToken);
    }

    public async ValueTask DisposeAsync()
    {
        await _gateway.DisposeAsync();
        await _controller.DisposeAsync();
        foreach (var service in _services)
        {
            await service.DisposeAsync();
        }
        await _redis.DisposeAsync();
        foreach (var folder in new[] { _brown, _model, _out })
        {
            Directory.Delete(folder, recursive: true);
        }
    }

    [Fact]
    public async Task Replay_serves_every_mode_through_the_gateway_with_its_layer_mix_and_restores_the_policy()
    {
        var ct = TestContext.Current.CancellationToken;
        var before = await _controller.Admin.SetPolicyAsync(new SetPolicyRequest { PolicyJson = """{ "description": "in force before the replay" }""", Comment = "test" }, cancellationToken: ct);
        var json = Path.Combine(_out, "replay.json");
        var png = Path.Combine(_out, "replay.png");

        var (code, output, error) = await DslactlAsync([
            "bench", "replay", .. _controller.CliArgs, "--gateway", _gateway.GrpcAddress.ToString(), "--api-key", GatewayHost.Key,
            "--model", _model, "--corpus", _brown, "--requests", "4", "--repeat", "2", "--rate", "30", "--output-tokens", "4", "--length-scale", "0.02",
            "--modes", "attention,dsla50", "--warmup", "1", "--sample-ms", "50", "--ppl-tokens", "256", "--ppl-seq-len", "64",
            "--json", json, "--png", png]);

        Assert.True(code == 0, $"exit {code}\n{error}\n{output}");
        using var report = JsonDocument.Parse(await File.ReadAllTextAsync(json, ct));
        var modes = report.RootElement.GetProperty("modes").EnumerateArray().ToList();
        Assert.Equal(["attention", "dsla50"], modes.Select(m => m.GetProperty("summary").GetProperty("mode").GetString()));
        var ids = _services.Select(s => s.Id).ToHashSet();
        foreach (var (mode, dslaLayers) in modes.Zip(new[] { 0, 2 }))
        {
            var summary = mode.GetProperty("summary");
            Assert.Equal(8, summary.GetProperty("completed").GetInt32());   // 4 requests × 2 repetitions
            Assert.Equal(2, summary.GetProperty("round_means_ms").GetArrayLength());
            Assert.Equal(0, summary.GetProperty("failed").GetInt32());
            Assert.True(summary.GetProperty("latency_per_token_ms").GetProperty("mean").GetDouble() > 0);
            Assert.Equal(dslaLayers / 4.0, summary.GetProperty("mean_dsla_fraction").GetDouble(), 6);
            foreach (var request in mode.GetProperty("requests").EnumerateArray())
            {
                Assert.Equal("ok", request.GetProperty("outcome").GetString());
                Assert.Equal(request.GetProperty("max_tokens").GetInt32(), request.GetProperty("output_tokens").GetInt32());
                Assert.Contains(request.GetProperty("replica").GetString()!, ids);
                // The manifest converts the last layers first.
                Assert.Equal(dslaLayers == 0 ? [] : [2, 3], request.GetProperty("decode_dsla_layers").EnumerateArray().Select(l => l.GetInt32()).Order());
            }
            Assert.Contains(mode.GetProperty("mix").EnumerateArray(), s => ids.Contains(s.GetProperty("service_id").GetString()!));
        }
        var perplexities = modes.Select(m => m.GetProperty("summary").GetProperty("served_perplexity").GetDouble()).ToList();
        Assert.All(perplexities, p => Assert.True(p > 1));
        Assert.NotEqual(perplexities[0], perplexities[1]);

        Assert.Contains("attention ", output);
        Assert.Contains("dsla50: mean per-token latency", output);
        var image = await File.ReadAllBytesAsync(png, ct);
        Assert.True(image.Length > 10_000, $"{image.Length} bytes");
        Assert.Equal(new byte[] { 0x89, 0x50, 0x4E, 0x47 }, image[..4]);

        var after = await _controller.Admin.GetPolicyAsync(new GetPolicyRequest(), cancellationToken: ct);
        Assert.True(after.Version > before.Version);
        Assert.Contains("in force before the replay", after.PolicyJson);
        Assert.Contains($"restore version {before.Version}", after.Comment);
    }

    [Fact]
    public async Task Replay_refuses_an_unknown_mode_a_missing_trace_and_a_wrong_key_before_touching_the_fleet()
    {
        var ct = TestContext.Current.CancellationToken;
        var version = (await _controller.Admin.GetPolicyAsync(new GetPolicyRequest(), cancellationToken: ct)).Version;
        var (code, _, error) = await DslactlAsync(["bench", "replay", .. _controller.CliArgs, "--model", _model, "--corpus", _brown, "--modes", "attention,turbo"]);
        Assert.Equal(ExitCodes.InvalidInput, code);
        Assert.Contains("--modes: 'turbo' is not attention, adaptive or dslaNN", error);
        (code, _, error) = await DslactlAsync(["bench", "replay", .. _controller.CliArgs, "--model", _model, "--corpus", _brown, "--trace", Path.Combine(_out, "none.csv")]);
        Assert.Equal(ExitCodes.InvalidInput, code);
        Assert.Contains("none.csv", error);
        (code, _, error) = await DslactlAsync(["bench", "replay", .. _controller.CliArgs, "--gateway", _gateway.GrpcAddress.ToString(), "--api-key", "not-a-key-0123456789",
            "--model", _model, "--corpus", _brown, "--requests", "4"]);
        Assert.Equal(ExitCodes.InvalidInput, code);
        Assert.Contains("--api-key: the gateway refused it (Unauthenticated", error);
        Assert.Equal(version, (await _controller.Admin.GetPolicyAsync(new GetPolicyRequest(), cancellationToken: ct)).Version);
    }

    private static async Task<(int Code, string Output, string Error)> DslactlAsync(string[] args)
    {
        using var output = new StringWriter();
        using var error = new StringWriter();
        var code = await DslaCtl.CreateRootCommand().Parse(args).InvokeAsync(new InvocationConfiguration { Output = output, Error = error }, TestContext.Current.CancellationToken);
        return (code, output.ToString(), error.ToString());
    }
}

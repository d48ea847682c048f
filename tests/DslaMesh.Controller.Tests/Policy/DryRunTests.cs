using System.Text.Json;
using DslaMesh.Controller.Tests.Infrastructure;
using DslaMesh.Fleet;
using DslaMesh.Policy;

namespace DslaMesh.Controller.Tests.Policy;

/// <summary>Dry run: a recorded trace through a policy gives the decisions, with their timestamps.</summary>
public sealed class DryRunTests : IDisposable
{
    private static readonly DateTimeOffset Start = new(2026, 3, 1, 12, 0, 0, TimeSpan.Zero);
    private readonly string _folder = Directory.CreateTempSubdirectory("dslamesh-dryrun-").FullName;

    private static ServiceMetricsRecord Record(string id, double seconds, int queue, int prompt) =>
        new(id, Start.AddSeconds(seconds), queue, 2, new Dictionary<string, int> { [FleetKeys.PromptBucket(prompt)] = 2 }, prompt, 0, 1 << 30, 0.1, 0.3, 0.02, 0.05, [], 8, 0, false);

    private static string Trace(params ServiceMetricsRecord[] records) =>
        string.Join('\n', records.Select(r => JsonSerializer.Serialize(r, FleetJsonContext.Default.ServiceMetricsRecord)));

    private const string PolicyJson = """
        { "triggers": { "queue_depth": { "high": 4, "low": 1 }, "kv_usage": null }, "cooldown_ms": 1000, "prompt_window_ms": 0 }
        """;

    private static readonly ServiceMetricsRecord[] Burst =
    [
        Record("a", 0.0, 0, 500),
        Record("a", 0.5, 6, 9000),     // convert 7 (cap 50% of 8 = 4)
        Record("a", 1.0, 6, 9000),     // cooldown
        Record("a", 1.5, 6, 9000),     // convert 6
        Record("a", 2.5, 6, 9000),     // convert 5
        Record("a", 3.5, 3, 9000),     // between the marks
        Record("a", 4.5, 0, 500),      // over the cap of 1 (12.5% of 8): revert 5
        Record("a", 5.5, 0, 500),      // revert 6
        Record("a", 6.5, 0, 500),      // calm: revert 7
        Record("a", 7.5, 0, 500),      // nothing left
    ];

    [Fact]
    public void Replay_reports_each_conversion_and_reversion_with_its_timestamp()
    {
        var policy = PolicyParser.Parse(PolicyJson).Policy!;
        var decisions = DryRun.Replay(policy, DryRun.ReadTrace(new StringReader(Trace([.. Burst.Reverse()]))));
        Assert.Equal(
        [
            "0.5 convert [7] -> [7]",
            "1.5 convert [6] -> [6,7]",
            "2.5 convert [5] -> [5,6,7]",
            "4.5 revert [5] -> [6,7]",
            "5.5 revert [6] -> [7]",
            "6.5 revert [7] -> []",
        ], decisions.Select(d => FormattableString.Invariant($"{(d.Timestamp - Start).TotalSeconds} {d.Action} [{string.Join(",", d.Changed)}] -> [{string.Join(",", d.DslaLayers)}]")));
        Assert.Contains("over the cap of 1", decisions[3].Reason);
        Assert.Contains("calm", decisions[5].Reason);
    }

    [Fact]
    public void Bad_trace_line_names_the_line()
    {
        var error = Assert.Throws<FormatException>(() => DryRun.ReadTrace(new StringReader(Trace(Burst[0]) + "\n\n{\"id\": 3}\n")));
        Assert.StartsWith("trace line 3:", error.Message);
    }

    [Fact]
    public async Task Dslactl_dry_run_prints_the_decisions_as_text_and_json()
    {
        var policy = Path.Combine(_folder, "policy.json");
        var trace = Path.Combine(_folder, "trace.jsonl");
        await File.WriteAllTextAsync(policy, PolicyJson, TestContext.Current.CancellationToken);
        await File.WriteAllTextAsync(trace, Trace(Burst), TestContext.Current.CancellationToken);

        var (code, output, error) = await TestFleet.Dslactl("policy", "dry-run", "-f", policy, "--trace", trace);
        Assert.True(code == 0, error);
        var lines = output.Split('\n', StringSplitOptions.RemoveEmptyEntries);
        Assert.StartsWith("2026-03-01T12:00:00.500Z  a  convert [7]  dsla=[7] 1/8 (cap 4)  pressure (queue 6 ≥ 4)", lines[0]);
        Assert.Equal("3 conversions, 3 reversions over 10 records from 1 services", lines[^1]);

        (code, output, _) = await TestFleet.Dslactl("policy", "dry-run", "-f", policy, "--trace", trace, "--order", "0,1,2,3,4,5,6,7", "--output", "json");
        Assert.Equal(0, code);
        using var json = JsonDocument.Parse(output);
        Assert.Equal(6, json.RootElement.GetArrayLength());
        Assert.Equal(0, json.RootElement[0].GetProperty("changed")[0].GetInt32());
        Assert.Equal("2026-03-01T12:00:00.5+00:00", json.RootElement[0].GetProperty("timestamp").GetString());

        (code, _, error) = await TestFleet.Dslactl("policy", "dry-run", "-f", policy, "--trace", Path.Combine(_folder, "missing.jsonl"));
        Assert.Equal(2, code);
        Assert.Contains("missing.jsonl: no such file", error);
    }

    public void Dispose() => Directory.Delete(_folder, recursive: true);
}

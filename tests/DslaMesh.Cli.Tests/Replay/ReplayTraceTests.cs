using DslaMesh.Cli.Replay;
using DslaMesh.Policy;

namespace DslaMesh.Cli.Tests.Replay;

/// <summary>The trace reader, the paper's mix generator, scaling, modes and the summary arithmetic.</summary>
public sealed class ReplayTraceTests
{
    [Fact]
    public void Azure_trace_rows_become_arrivals_relative_to_the_first_in_time_order()
    {
        // The Splitwise/Azure 2023 format, rows out of order, an extra column, header in another case.
        const string csv = """
            timestamp,ContextTokens,GeneratedTokens,Extra
            2023-11-16 18:15:47.1805900,2048,12,x
            2023-11-16 18:15:46.6805900,374,44,y
            2023-11-16 18:15:50.6805900,9000,300,z
            """;
        var trace = ReplayTrace.ReadAzure(new StringReader(csv), "azure.csv");
        Assert.Equal([0.0, 0.5, 4.0], trace.Select(r => Math.Round(r.ArrivalSeconds, 6)));
        Assert.Equal([374, 2048, 9000], trace.Select(r => r.ContextTokens));
        Assert.Equal([44, 12, 300], trace.Select(r => r.GeneratedTokens));
    }

    [Fact]
    public void Azure_trace_errors_name_the_file_the_line_and_the_field()
    {
        var missing = Assert.Throws<FormatException>(() => ReplayTrace.ReadAzure(new StringReader("TIMESTAMP,ContextTokens\n1,2\n"), "t.csv"));
        Assert.Contains("t.csv: the header lacks GENERATEDTOKENS", missing.Message);
        var bad = Assert.Throws<FormatException>(() => ReplayTrace.ReadAzure(new StringReader("TIMESTAMP,ContextTokens,GeneratedTokens\n0,10,5\n1,ten,5\n"), "t.csv"));
        Assert.Equal("t.csv line 3: ContextTokens 'ten' is not a non-negative integer.", bad.Message);
        var time = Assert.Throws<FormatException>(() => ReplayTrace.ReadAzure(new StringReader("TIMESTAMP,ContextTokens,GeneratedTokens\nsoon,10,5\n"), "t.csv"));
        Assert.Contains("TIMESTAMP 'soon'", time.Message);
        Assert.Throws<FormatException>(() => ReplayTrace.ReadAzure(new StringReader("TIMESTAMP,ContextTokens,GeneratedTokens\n"), "t.csv"));
    }

    [Fact]
    public void Generated_trace_follows_the_papers_length_mix_and_the_asked_rate()
    {
        var trace = ReplayTrace.Generate(new TraceGeneratorSettings { Requests = 20000, RatePerSecond = 4, Seed = 7 });
        double Share(int min, int max) => trace.Count(r => r.ContextTokens >= min && r.ContextTokens <= max) / (double)trace.Count;
        Assert.InRange(Share(0, 2047), 0.6468 - 0.015, 0.6468 + 0.015);
        Assert.InRange(Share(2048, 4095), 0.1616 - 0.01, 0.1616 + 0.01);
        Assert.InRange(Share(4096, 8191), 0.1603 - 0.01, 0.1603 + 0.01);
        Assert.InRange(Share(8192, int.MaxValue), 0.031 - 0.005, 0.031 + 0.005);
        var gaps = trace.Zip(trace.Skip(1), (a, b) => b.ArrivalSeconds - a.ArrivalSeconds).ToArray();
        Assert.All(gaps, g => Assert.True(g >= 0));
        Assert.InRange(gaps.Average(), 0.25 * 0.97, 0.25 * 1.03);
        Assert.InRange(CoefficientOfVariation(gaps), 0.95, 1.05);   // Poisson
        Assert.All(trace, r => Assert.InRange(r.GeneratedTokens, 64, 192));
    }

    [Fact]
    public void Bursty_arrivals_keep_the_mean_rate_with_the_asked_variability()
    {
        var trace = ReplayTrace.Generate(new TraceGeneratorSettings { Requests = 40000, RatePerSecond = 2, Arrivals = ArrivalProcess.Bursty, Burstiness = 3, Seed = 11 });
        var gaps = trace.Zip(trace.Skip(1), (a, b) => b.ArrivalSeconds - a.ArrivalSeconds).ToArray();
        Assert.InRange(gaps.Average(), 0.5 * 0.93, 0.5 * 1.07);
        Assert.InRange(CoefficientOfVariation(gaps), 2.6, 3.4);
        Assert.Equal(trace, ReplayTrace.Generate(new TraceGeneratorSettings { Requests = 40000, RatePerSecond = 2, Arrivals = ArrivalProcess.Bursty, Burstiness = 3, Seed = 11 }));
    }

    [Fact]
    public void Bad_generator_settings_are_refused_with_the_option_name()
    {
        Assert.Contains("--rate", Assert.Throws<ArgumentException>(() => ReplayTrace.Generate(new TraceGeneratorSettings { RatePerSecond = 0 })).Message);
        Assert.Contains("--burstiness", Assert.Throws<ArgumentException>(() => ReplayTrace.Generate(new TraceGeneratorSettings { Arrivals = ArrivalProcess.Bursty, Burstiness = 1 })).Message);
        Assert.Contains("--requests", Assert.Throws<ArgumentException>(() => ReplayTrace.Generate(new TraceGeneratorSettings { Requests = 0 })).Message);
    }

    [Fact]
    public void Scaling_shrinks_prompts_speeds_arrivals_and_keeps_every_request_within_the_context()
    {
        TraceRequest[] trace = [new(0, 16000, 900), new(10, 800, 20), new(20, 3, 1)];
        var scaled = ReplayTrace.Scale(trace, lengthScale: 0.125, speedup: 2, maxOutputTokens: 256, contextLength: 1024);
        Assert.Equal([new TraceRequest(0, 768, 256), new TraceRequest(5, 100, 20), new TraceRequest(10, 1, 1)], scaled);
        Assert.All(scaled, r => Assert.True(r.ContextTokens + r.GeneratedTokens <= 1024));
        Assert.Throws<ArgumentException>(() => ReplayTrace.Scale(trace, 0, 1, 16, 1024));
    }

    [Fact]
    public void Modes_are_policies_the_controller_accepts_and_static_ones_name_their_layer_count()
    {
        var adaptive = ReplayModes.ScaledDefault(0.125);
        Assert.Equal([0, 256, 512, 1024], adaptive.MaxConversionRate.Select(b => b.MinPromptTokens));
        foreach (var name in new[] { "attention", "adaptive", "dsla25", "dsla50", "dsla100" })
        {
            var mode = ReplayModes.Parse(name, adaptive);
            var parsed = PolicyParser.Parse(mode.PolicyJson);
            Assert.True(parsed.IsValid, $"{name}: {string.Join("; ", parsed.Errors)}");
        }
        Assert.Equal(0.25, ReplayModes.Parse("dsla25", adaptive).StaticFraction);
        Assert.Equal(0, ReplayModes.Parse("attention", adaptive).StaticFraction);
        Assert.Null(ReplayModes.Parse("adaptive", adaptive).StaticFraction);
        Assert.Equal(8, ReplayModes.StaticLayers(0.25, 32));
        Assert.Equal(4, ReplayModes.StaticLayers(0.5, 8));
        Assert.Equal(1, ReplayModes.StaticLayers(0.25, 6));
        Assert.Contains("'dsla0'", Assert.Throws<ArgumentException>(() => ReplayModes.Parse("dsla0", adaptive)).Message);
        Assert.Throws<ArgumentException>(() => ReplayModes.Parse("static", adaptive));
    }

    [Fact]
    public void Summary_counts_conversions_goodput_and_latencies_from_the_records()
    {
        RequestRecord Ok(int i, double ttft, double e2e, int tokens) => new()
        {
            Index = i, Outcome = "ok", TtftMs = ttft, E2eMs = e2e, OutputTokens = tokens,
            TpotMs = (e2e - ttft) / (tokens - 1), LatencyPerTokenMs = e2e / tokens,
        };
        RequestRecord[] requests = [Ok(0, 100, 1000, 10), Ok(1, 3000, 4000, 10), Ok(2, 100, 3000, 11), new() { Index = 3, Outcome = "rejected" }, new() { Index = 4, Outcome = "error" }];
        MixSample[] mix = [new(0, "a", 0, 8, 0, 0), new(1, "a", 2, 8, 0, 0), new(2, "a", 1, 8, 0, 0), new(0, "b", 4, 8, 0, 0), new(1, "b", 4, 8, 0, 0)];
        var summary = ModeSummary.Of(ReplayModes.Parse("attention", ReplayModes.ScaledDefault(1)), new ReplayRun(requests, mix, 10), new ServiceLevelObjective(2000, 200));
        Assert.Equal((3, 1, 1), (summary.Completed, summary.Rejected, summary.Failed));
        Assert.Equal(1, summary.MetSlo);   // request 1 misses TTFT, request 2 misses TPOT (290 ms)
        Assert.Equal(0.1, summary.GoodputPerSecond, 6);
        Assert.Equal((2, 1), (summary.Conversions, summary.Reverts));
        Assert.Equal((0 + 2 + 1 + 4 + 4) / 8.0 / 5, summary.MeanDslaFraction, 6);
        Assert.Equal((100 + 400 + 3000 / 11.0) / 3, summary.LatencyPerToken!.Mean, 6);
        Assert.Equal(3, summary.LatencyPerToken.Count);
        Assert.Equal(3.1, summary.OutputTokensPerSecond, 6);

        // A second repetition starts from its own settled mix: the jump between repetitions is not a conversion.
        MixSample[] rounds = [new(0, "a", 0, 8, 0, 0, Round: 0), new(1, "a", 2, 8, 0, 0, Round: 0), new(0, "a", 0, 8, 0, 0, Round: 1), new(1, "a", 1, 8, 0, 0, Round: 1)];
        Assert.Equal((3, 0), ModeSummary.LayerChanges(rounds));
    }

    private static double CoefficientOfVariation(double[] values)
    {
        var mean = values.Average();
        return Math.Sqrt(values.Sum(v => (v - mean) * (v - mean)) / (values.Length - 1)) / mean;
    }
}

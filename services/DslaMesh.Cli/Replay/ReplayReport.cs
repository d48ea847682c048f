using System.Globalization;
using System.Text;
using System.Text.Json.Serialization;
using MathNet.Numerics.Statistics;

namespace DslaMesh.Cli.Replay;

/// <summary>Mean, median and 99th percentile of one latency over the requests that have it (milliseconds).</summary>
public sealed record LatencyStats(
    [property: JsonPropertyName("mean")] double Mean,
    [property: JsonPropertyName("p50")] double P50,
    [property: JsonPropertyName("p99")] double P99,
    [property: JsonPropertyName("count")] int Count)
{
    /// <summary>The statistics of some values; null when there are none.</summary>
    public static LatencyStats? Of(IEnumerable<double> values)
    {
        var data = values.ToArray();
        return data.Length == 0 ? null : new LatencyStats(data.Mean(), data.Quantile(0.5), data.Quantile(0.99), data.Length);
    }
}

/// <summary>The latency objective a request must meet to count towards goodput.</summary>
public sealed record ServiceLevelObjective(
    [property: JsonPropertyName("ttft_ms")] double TtftMs,
    [property: JsonPropertyName("tpot_ms")] double TpotMs);

/// <summary>What one mode achieved.</summary>
public sealed record ModeSummary
{
    [JsonPropertyName("mode")] public required string Mode { get; init; }
    [JsonPropertyName("description")] public required string Description { get; init; }
    [JsonPropertyName("requests")] public int Requests { get; init; }
    [JsonPropertyName("completed")] public int Completed { get; init; }
    [JsonPropertyName("rejected")] public int Rejected { get; init; }
    [JsonPropertyName("failed")] public int Failed { get; init; }
    [JsonPropertyName("duration_s")] public double DurationSeconds { get; init; }
    [JsonPropertyName("output_tokens_per_s")] public double OutputTokensPerSecond { get; init; }
    [JsonPropertyName("ttft_ms")] public LatencyStats? Ttft { get; init; }
    [JsonPropertyName("tpot_ms")] public LatencyStats? Tpot { get; init; }
    [JsonPropertyName("latency_per_token_ms")] public LatencyStats? LatencyPerToken { get; init; }
    [JsonPropertyName("e2e_ms")] public LatencyStats? EndToEnd { get; init; }
    [JsonPropertyName("met_slo")] public int MetSlo { get; init; }
    [JsonPropertyName("goodput_per_s")] public double GoodputPerSecond { get; init; }
    [JsonPropertyName("conversions")] public int Conversions { get; init; }
    [JsonPropertyName("reverts")] public int Reverts { get; init; }
    [JsonPropertyName("mean_dsla_fraction")] public double MeanDslaFraction { get; init; }
    [JsonPropertyName("served_perplexity")] public double? ServedPerplexity { get; set; }

    /// <summary>Mean per-token latency of each repetition of the trace (one entry without <c>--repeat</c>).</summary>
    [JsonPropertyName("round_means_ms")] public IReadOnlyList<double> RoundMeans { get; init; } = [];

    /// <summary>Summarises one replay.</summary>
    public static ModeSummary Of(ReplayMode mode, ReplayRun run, ServiceLevelObjective slo)
    {
        ArgumentNullException.ThrowIfNull(mode);
        ArgumentNullException.ThrowIfNull(run);
        ArgumentNullException.ThrowIfNull(slo);
        var ok = run.Requests.Where(r => r.Outcome == "ok").ToList();
        var met = ok.Count(r => r.TtftMs <= slo.TtftMs && (r.TpotMs ?? 0) <= slo.TpotMs);
        var (conversions, reverts) = LayerChanges(run.Mix);
        return new ModeSummary
        {
            Mode = mode.Name,
            Description = mode.Description,
            Requests = run.Requests.Count,
            Completed = ok.Count,
            Rejected = run.Requests.Count(r => r.Outcome == "rejected"),
            Failed = run.Requests.Count(r => r.Outcome is not ("ok" or "rejected")),
            DurationSeconds = run.DurationSeconds,
            OutputTokensPerSecond = run.DurationSeconds > 0 ? ok.Sum(r => r.OutputTokens) / run.DurationSeconds : 0,
            Ttft = LatencyStats.Of(ok.Where(r => r.TtftMs is not null).Select(r => r.TtftMs!.Value)),
            Tpot = LatencyStats.Of(ok.Where(r => r.TpotMs is not null).Select(r => r.TpotMs!.Value)),
            LatencyPerToken = LatencyStats.Of(ok.Where(r => r.LatencyPerTokenMs is not null).Select(r => r.LatencyPerTokenMs!.Value)),
            EndToEnd = LatencyStats.Of(ok.Where(r => r.E2eMs is not null).Select(r => r.E2eMs!.Value)),
            MetSlo = met,
            GoodputPerSecond = run.DurationSeconds > 0 ? met / run.DurationSeconds : 0,
            Conversions = conversions,
            Reverts = reverts,
            MeanDslaFraction = run.Mix.Count == 0 ? 0 : run.Mix.Average(s => s.LayerCount == 0 ? 0 : (double)s.DslaLayers / s.LayerCount),
            RoundMeans = [.. ok.Where(r => r.LatencyPerTokenMs is not null).GroupBy(r => r.Round).OrderBy(g => g.Key).Select(g => g.Average(r => r.LatencyPerTokenMs!.Value))],
        };
    }

    /// <summary>
    /// Layers converted and reverted, summed over services, from consecutive readings of each service's mix within one
    /// repetition (the settling between repetitions is not counted).
    /// </summary>
    public static (int Conversions, int Reverts) LayerChanges(IReadOnlyList<MixSample> mix)
    {
        ArgumentNullException.ThrowIfNull(mix);
        int conversions = 0, reverts = 0;
        foreach (var service in mix.GroupBy(s => (s.ServiceId, s.Round)))
        {
            var previous = -1;
            foreach (var sample in service.OrderBy(s => s.Seconds))
            {
                if (previous >= 0)
                {
                    conversions += Math.Max(0, sample.DslaLayers - previous);
                    reverts += Math.Max(0, previous - sample.DslaLayers);
                }
                previous = sample.DslaLayers;
            }
        }
        return (conversions, reverts);
    }
}

/// <summary>One mode's summary and raw measurements.</summary>
public sealed record ModeResult(
    [property: JsonPropertyName("summary")] ModeSummary Summary,
    [property: JsonPropertyName("requests")] IReadOnlyList<RequestRecord> Requests,
    [property: JsonPropertyName("mix")] IReadOnlyList<MixSample> Mix);

/// <summary>How the replay was set up.</summary>
public sealed record ReplaySetup
{
    [JsonPropertyName("trace")] public required string Trace { get; init; }
    [JsonPropertyName("requests")] public int Requests { get; init; }
    [JsonPropertyName("offered_rate_per_s")] public double OfferedRatePerSecond { get; init; }
    [JsonPropertyName("length_scale")] public double LengthScale { get; init; }
    [JsonPropertyName("speedup")] public double Speedup { get; init; }
    [JsonPropertyName("mean_prompt_tokens")] public double MeanPromptTokens { get; init; }
    [JsonPropertyName("mean_output_tokens")] public double MeanOutputTokens { get; init; }
    [JsonPropertyName("slo")] public required ServiceLevelObjective Slo { get; init; }
    [JsonPropertyName("model")] public required string Model { get; init; }
    [JsonPropertyName("services")] public required IReadOnlyList<string> Services { get; init; }
    [JsonPropertyName("client_machine")] public required string ClientMachine { get; init; }
    [JsonPropertyName("started_at")] public DateTimeOffset StartedAt { get; init; }
}

/// <summary>The whole replay benchmark: setup, every mode, and adaptive against static all-attention.</summary>
public sealed record ReplayReport
{
    [JsonPropertyName("setup")] public required ReplaySetup Setup { get; init; }
    [JsonPropertyName("modes")] public required IReadOnlyList<ModeResult> Modes { get; init; }

    /// <summary>Mean per-token latency (end-to-end / output tokens) of all-attention ÷ that of adaptive: above 1 = adaptive faster.</summary>
    [JsonPropertyName("adaptive_speedup")] public double? AdaptiveSpeedup => Ratio("attention", "adaptive");

    /// <summary>all-attention ÷ mode, for a pair of modes by name; null when either is missing or has no measurement.</summary>
    public double? Ratio(string baseline, string mode)
    {
        var b = Modes.FirstOrDefault(m => m.Summary.Mode == baseline)?.Summary.LatencyPerToken?.Mean;
        var m = Modes.FirstOrDefault(m => m.Summary.Mode == mode)?.Summary.LatencyPerToken?.Mean;
        return b is { } x && m is { } y && y > 0 ? x / y : null;
    }

    /// <summary>The summary as a plain-text table.</summary>
    public string FormatTable()
    {
        var c = CultureInfo.InvariantCulture;
        var text = new StringBuilder();
        var s = Setup;
        text.AppendLine(c, $"replay of {s.Trace}: {s.Requests} requests at {s.OfferedRatePerSecond:F2}/s offered, mean prompt {s.MeanPromptTokens:F0} tokens, mean output {s.MeanOutputTokens:F0} tokens");
        text.AppendLine(c, $"model {s.Model} on {s.Services.Count} service(s): {string.Join(", ", s.Services)}; SLO TTFT ≤ {s.Slo.TtftMs:F0} ms, TPOT ≤ {s.Slo.TpotMs:F0} ms");
        text.AppendLine("mode        done  rej fail  lat/tok mean   p50     p99 │ TPOT mean    p99 │ TTFT mean     p99 │ e2e mean   goodput/s  tok/s  conv  rev  DSLA   ppl");
        foreach (var m in Modes.Select(m => m.Summary))
        {
            text.AppendLine(c, $"{m.Mode,-10} {m.Completed,5} {m.Rejected,4} {m.Failed,4}  {Ms(m.LatencyPerToken?.Mean),9} {Ms(m.LatencyPerToken?.P50),7} {Ms(m.LatencyPerToken?.P99),7} │ {Ms(m.Tpot?.Mean),9} {Ms(m.Tpot?.P99),6} │ {Ms(m.Ttft?.Mean),9} {Ms(m.Ttft?.P99),7} │ {Ms(m.EndToEnd?.Mean),8} {m.GoodputPerSecond,10:F2} {m.OutputTokensPerSecond,6:F1} {m.Conversions,5} {m.Reverts,4} {m.MeanDslaFraction,5:P0} {(m.ServedPerplexity is { } p ? p.ToString("F2", c) : "-"),6}");
        }
        text.AppendLine("(ms; lat/tok = end-to-end latency / output tokens, the paper's per-token latency; DSLA = time-averaged fraction of layers)");
        foreach (var m in Modes.Select(m => m.Summary).Where(m => m.RoundMeans.Count > 1))
        {
            text.AppendLine(c, $"{m.Mode}: per-token latency mean of each repetition {string.Join(" / ", m.RoundMeans.Select(v => v.ToString("F1", c)))} ms");
        }
        foreach (var mode in Modes.Select(m => m.Summary.Mode).Where(m => m != "attention"))
        {
            if (Ratio("attention", mode) is { } ratio)
            {
                text.AppendLine(c, $"{mode}: mean per-token latency {ratio:F2}× {(ratio >= 1 ? "lower" : "higher")} than static all-attention ({(ratio >= 1 ? ratio : 1 / ratio):F2}× {(ratio >= 1 ? "faster" : "slower")})");
            }
        }
        return text.ToString();
    }

    private static string Ms(double? value) => value is { } v ? v.ToString(v >= 1000 ? "F0" : "F1", CultureInfo.InvariantCulture) : "-";
}

/// <summary>Source-generated JSON for the replay report.</summary>
[JsonSourceGenerationOptions(WriteIndented = true, DefaultIgnoreCondition = JsonIgnoreCondition.WhenWritingNull, PropertyNamingPolicy = JsonKnownNamingPolicy.SnakeCaseLower)]
[JsonSerializable(typeof(ReplayReport))]
public sealed partial class ReplayJsonContext : JsonSerializerContext;

using System.Diagnostics;
using System.Text.Json.Serialization;
using DslaMesh.Engine.Inference;
using DslaMesh.Engine.Models;
using DslaMesh.Engine.Serving;

namespace DslaMesh.Engine.Diagnostics;

/// <summary>What <see cref="ServingBenchmark"/> measures.</summary>
public sealed record ServingBenchmarkOptions
{
    public IReadOnlyList<int> Concurrency { get; init; } = [1, 2, 4, 8, 16, 32, 64];
    public IReadOnlyList<double> DslaFractions { get; init; } = [0, 0.25, 0.5];
    public int PromptTokens { get; init; } = 128;
    public int MaxTokens { get; init; } = 32;
    /// <summary>Requests per (fraction, concurrency) cell, at least the concurrency.</summary>
    public int RequestsPerLevel { get; init; } = 32;
    public int StallSamples { get; init; } = 6;
    public long Seed { get; init; } = 1;
    public int MaxBatchSize { get; init; } = 64;
}

/// <summary>One (fraction, concurrency) cell.</summary>
public sealed record ServingBenchmarkRow(
    double DslaFraction,
    IReadOnlyList<int> DslaLayers,
    int Concurrency,
    int Requests,
    double TokensPerSecond,
    double TtftP50Ms,
    double TtftP99Ms,
    double ItlP50Ms,
    double ItlP99Ms,
    double WallSeconds);

/// <summary>Engine pause per conversion command, with streams running.</summary>
public sealed record StallSample(int Layer, string Direction, int RunningStreams, double StallMs, int SequencesFolded);

/// <summary>The whole report.</summary>
public sealed record ServingBenchmarkReport(
    string Device,
    string Model,
    int Layers,
    string Variant,
    int PromptTokens,
    int MaxTokens,
    IReadOnlyList<ServingBenchmarkRow> Rows,
    IReadOnlyList<StallSample> Stalls,
    DateTimeOffset StartedAt);

/// <summary>
/// Throughput and latency of the continuous-batching engine against concurrency, at several fractions of layers
/// converted to DSLA, plus the stall each live conversion costs. Clients are closed loops: each keeps one request in
/// flight and sends the next when it completes.
/// </summary>
public static class ServingBenchmark
{
    /// <summary>Runs every cell; reports progress as text lines.</summary>
    public static async Task<ServingBenchmarkReport> RunAsync(LlamaForCausalLM model, IReadOnlyList<int> conversionOrder, string variant, string modelName,
        ServingBenchmarkOptions options, Action<string>? progress = null, CancellationToken cancellationToken = default)
    {
        var started = DateTimeOffset.UtcNow;
        var layers = model.Config.NumHiddenLayers;
        var random = new Random((int)options.Seed);
        var prompts = Enumerable.Range(0, 256).Select(_ => Enumerable.Range(0, options.PromptTokens).Select(_ => random.Next(3, model.Config.VocabSize)).ToArray()).ToArray();
        var sampling = SamplingParameters.Greedy(options.MaxTokens) with { IgnoreEos = true };
        var rows = new List<ServingBenchmarkRow>();
        var stalls = new List<StallSample>();
        long epoch = 0;
        var engineOptions = new ServingEngineOptions { MaxBatchSize = options.MaxBatchSize, MaxQueuedRequests = 4096, PrefillChunkTokens = Math.Max(64, options.PromptTokens) };
        using var engine = new ServingEngine(model, null, engineOptions, conversionOrder, variant);
        var readiness = await engine.Ready.ConfigureAwait(false);
        if (readiness.DecodeGraphBatchSizes > 0)
        {
            progress?.Invoke($"decode graphs captured for batch sizes 1–{readiness.DecodeGraphBatchSizes} in {readiness.Elapsed.TotalSeconds:F2} s");
        }

        foreach (var fraction in options.DslaFractions)
        {
            var count = (int)Math.Floor(fraction * layers);
            var target = conversionOrder.Take(count).ToHashSet();
            var changes = Enumerable.Range(0, layers).ToDictionary(l => l, target.Contains);
            var applied = await engine.ApplyAsync(++epoch, changes, cancellationToken).ConfigureAwait(false);
            if (!applied.Accepted)
            {
                throw new InvalidOperationException($"Cannot convert {count} layers: {applied.Reason}");
            }
            // Warm-up so allocator and kernels are ready.
            await RunLevel(engine, prompts, sampling, 2, 2, cancellationToken).ConfigureAwait(false);
            foreach (var concurrency in options.Concurrency)
            {
                var requests = Math.Max(options.RequestsPerLevel, concurrency);
                var (ttfts, itls, tokens, wall) = await RunLevel(engine, prompts, sampling, concurrency, requests, cancellationToken).ConfigureAwait(false);
                var row = new ServingBenchmarkRow(fraction, [.. applied.DslaLayers], concurrency, requests, tokens / wall,
                    Quantile(ttfts, 0.5) * 1e3, Quantile(ttfts, 0.99) * 1e3, Quantile(itls, 0.5) * 1e3, Quantile(itls, 0.99) * 1e3, wall);
                rows.Add(row);
                progress?.Invoke($"dsla {fraction:P1} concurrency {concurrency,3}: {row.TokensPerSecond,8:F1} tok/s  TTFT p50 {row.TtftP50Ms,8:F1} ms  ITL p50 {row.ItlP50Ms,7:F2} ms");
            }
        }

        // Stall per conversion with streams in flight: convert and revert one layer repeatedly.
        var running = Math.Min(8, options.MaxBatchSize);
        var layer = conversionOrder[0];
        await engine.ApplyAsync(++epoch, Enumerable.Range(0, layers).ToDictionary(l => l, _ => false), cancellationToken).ConfigureAwait(false);
        for (var i = 0; i < options.StallSamples; i++)
        {
            var load = Task.WhenAll(Enumerable.Range(0, running).Select(j => Drain(engine.Submit(new GenerationRequest($"stall{i}-{j}", prompts[j], SamplingParameters.Greedy(Math.Max(16, options.MaxTokens)) with { IgnoreEos = true }, Fidelity.Balanced, cancellationToken)), null)));
            while (engine.Snapshot.Running < running && !load.IsCompleted)
            {
                await Task.Delay(1, cancellationToken).ConfigureAwait(false);
            }
            await Task.Delay(20, cancellationToken).ConfigureAwait(false);
            var toDsla = i % 2 == 0;
            var streams = engine.Snapshot.Running;
            var result = await engine.ApplyAsync(++epoch, new Dictionary<int, bool> { [layer] = toDsla }, cancellationToken).ConfigureAwait(false);
            stalls.Add(new StallSample(layer, toDsla ? "to_dsla" : "to_attention", streams, result.StallSeconds * 1e3, toDsla ? streams : 0));
            await load.ConfigureAwait(false);
            progress?.Invoke($"conversion {(toDsla ? "→ dsla" : "→ attention")} of layer {layer} under {streams} streams: {result.StallSeconds * 1e3:F2} ms");
        }
        return new ServingBenchmarkReport(model.Device.ToString(), modelName, layers, variant, options.PromptTokens, options.MaxTokens, rows, stalls, started);
    }

    private static async Task<(List<double> Ttfts, List<double> Itls, long Tokens, double Wall)> RunLevel(ServingEngine engine, int[][] prompts, SamplingParameters sampling, int concurrency, int requests, CancellationToken cancellationToken)
    {
        var ttfts = new List<double>();
        var itls = new List<double>();
        long tokens = 0;
        var next = -1;
        var gate = new Lock();
        var clock = Stopwatch.StartNew();
        var workers = Enumerable.Range(0, concurrency).Select(async _ =>
        {
            int index;
            while ((index = Interlocked.Increment(ref next)) < requests)
            {
                var submitted = Stopwatch.GetTimestamp();
                var stamps = new List<long>();
                var reader = engine.Submit(new GenerationRequest($"b{index}", prompts[index % prompts.Length], sampling, Fidelity.Balanced, cancellationToken));
                var produced = await Drain(reader, stamps).ConfigureAwait(false);
                lock (gate)
                {
                    tokens += produced;
                    if (stamps.Count > 0)
                    {
                        ttfts.Add(Stopwatch.GetElapsedTime(submitted, stamps[0]).TotalSeconds);
                    }
                    for (var i = 1; i < stamps.Count; i++)
                    {
                        itls.Add(Stopwatch.GetElapsedTime(stamps[i - 1], stamps[i]).TotalSeconds);
                    }
                }
            }
        }).ToArray();
        await Task.WhenAll(workers).ConfigureAwait(false);
        return (ttfts, itls, tokens, clock.Elapsed.TotalSeconds);
    }

    private static async Task<int> Drain(System.Threading.Channels.ChannelReader<GenerationEvent> reader, List<long>? stamps)
    {
        var count = 0;
        await foreach (var e in reader.ReadAllAsync().ConfigureAwait(false))
        {
            switch (e)
            {
                case TokenEvent:
                    count++;
                    stamps?.Add(Stopwatch.GetTimestamp());
                    break;
                case ErrorEvent error:
                    throw new InvalidOperationException(error.Message);
                default:
                    break;
            }
        }
        return count;
    }

    private static double Quantile(List<double> values, double q)
    {
        if (values.Count == 0)
        {
            return 0;
        }
        var sorted = values.Order().ToArray();
        return sorted[Math.Clamp((int)Math.Ceiling(q * sorted.Length) - 1, 0, sorted.Length - 1)];
    }
}

/// <summary>Source-generated JSON for <see cref="ServingBenchmarkReport"/> (snake_case).</summary>
[JsonSourceGenerationOptions(PropertyNamingPolicy = JsonKnownNamingPolicy.SnakeCaseLower, WriteIndented = true)]
[JsonSerializable(typeof(ServingBenchmarkReport))]
public sealed partial class ServingBenchmarkJsonContext : JsonSerializerContext;

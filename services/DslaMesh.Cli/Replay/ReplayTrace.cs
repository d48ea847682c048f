using System.Globalization;
using CsvHelper;
using CsvHelper.Configuration;
using MathNet.Numerics.Distributions;

namespace DslaMesh.Cli.Replay;

/// <summary>One request of an arrival trace: when it arrives (seconds after the first), its prompt and output lengths.</summary>
public sealed record TraceRequest(double ArrivalSeconds, int ContextTokens, int GeneratedTokens);

/// <summary>A prompt-length bucket of a trace mix: lengths drawn uniformly in [Min, Max], chosen with probability Share.</summary>
public sealed record LengthBucket(int MinTokens, int MaxTokens, double Share);

/// <summary>How arrivals are spaced.</summary>
public enum ArrivalProcess
{
    /// <summary>Exponential gaps (coefficient of variation 1).</summary>
    Poisson,

    /// <summary>Gamma gaps with a coefficient of variation above 1: the same mean rate, in bursts.</summary>
    Bursty,
}

/// <summary>What <see cref="ReplayTrace.Generate"/> makes.</summary>
public sealed record TraceGeneratorSettings
{
    /// <summary>Number of requests.</summary>
    public int Requests { get; init; } = 200;

    /// <summary>Mean arrival rate, requests per second.</summary>
    public double RatePerSecond { get; init; } = 1;

    /// <summary>Poisson or bursty arrivals.</summary>
    public ArrivalProcess Arrivals { get; init; } = ArrivalProcess.Poisson;

    /// <summary>Coefficient of variation of the gaps for bursty arrivals (above 1).</summary>
    public double Burstiness { get; init; } = 3;

    /// <summary>The prompt-length mix.</summary>
    public IReadOnlyList<LengthBucket> Mix { get; init; } = ReplayTrace.PaperMix;

    /// <summary>Mean output length; each request draws uniformly in [mean/2, 3·mean/2].</summary>
    public int OutputTokens { get; init; } = 128;

    /// <summary>Seed for arrivals and lengths.</summary>
    public int Seed { get; init; } = 1234;
}

/// <summary>Arrival traces: the Azure LLM inference trace CSV, the paper's augmented mix, and the scaling both need.</summary>
public static class ReplayTrace
{
    /// <summary>
    /// The paper's augmented prompt-length mix: under 2k tokens 64.68%, 2–4k 16.16%, 4–8k 16.03%, 8k and more 3.1%
    /// (the last bucket drawn up to 16k).
    /// </summary>
    public static IReadOnlyList<LengthBucket> PaperMix { get; } =
    [
        new(64, 2047, 0.6468),
        new(2048, 4095, 0.1616),
        new(4096, 8191, 0.1603),
        new(8192, 16384, 0.031),
    ];

    /// <summary>
    /// Reads an Azure LLM inference trace (Splitwise 2023 format): a header with TIMESTAMP, ContextTokens and
    /// GeneratedTokens (any order, any case, other columns ignored); TIMESTAMP either a date-time or seconds.
    /// Arrivals are returned in time order, relative to the first.
    /// </summary>
    public static IReadOnlyList<TraceRequest> ReadAzure(TextReader reader, string source)
    {
        ArgumentNullException.ThrowIfNull(reader);
        var configuration = new CsvConfiguration(CultureInfo.InvariantCulture)
        {
            PrepareHeaderForMatch = a => a.Header.Trim().ToUpperInvariant(),
            TrimOptions = TrimOptions.Trim,
        };
        using var csv = new CsvReader(reader, configuration);
        if (!csv.Read() || !csv.ReadHeader())
        {
            throw new FormatException($"{source}: empty file; expected a header with TIMESTAMP, ContextTokens, GeneratedTokens.");
        }
        var missing = new[] { "TIMESTAMP", "CONTEXTTOKENS", "GENERATEDTOKENS" }.Where(h => !csv.HeaderRecord!.Any(c => string.Equals(c.Trim(), h, StringComparison.OrdinalIgnoreCase))).ToList();
        if (missing.Count > 0)
        {
            throw new FormatException($"{source}: the header lacks {string.Join(", ", missing)} (it has {string.Join(", ", csv.HeaderRecord!)}).");
        }
        var rows = new List<(long Ticks, int Context, int Generated)>();
        while (csv.Read())
        {
            var line = csv.Parser.RawRow;
            rows.Add((Time(csv.GetField("TIMESTAMP"), source, line), Count(csv.GetField("CONTEXTTOKENS"), "ContextTokens", source, line), Count(csv.GetField("GENERATEDTOKENS"), "GeneratedTokens", source, line)));
        }
        if (rows.Count == 0)
        {
            throw new FormatException($"{source}: no requests after the header.");
        }
        var first = rows.Min(r => r.Ticks);
        return [.. rows.OrderBy(r => r.Ticks).Select(r => new TraceRequest((r.Ticks - first) / (double)TimeSpan.TicksPerSecond, r.Context, r.Generated))];
    }

    /// <summary>Makes a trace: arrivals at the mean rate (Poisson or bursty), prompt lengths from the mix.</summary>
    public static IReadOnlyList<TraceRequest> Generate(TraceGeneratorSettings settings)
    {
        ArgumentNullException.ThrowIfNull(settings);
        Require(settings.Requests > 0, "--requests must be positive.");
        Require(settings.RatePerSecond > 0 && double.IsFinite(settings.RatePerSecond), "--rate must be a positive number of requests per second.");
        Require(settings.OutputTokens > 0, "--output-tokens must be positive.");
        Require(settings.Mix.Count > 0 && settings.Mix.All(b => b.Share > 0 && b.MinTokens > 0 && b.MaxTokens >= b.MinTokens), "the length mix needs buckets with positive shares and 0 < min ≤ max.");
        Require(settings.Arrivals != ArrivalProcess.Bursty || settings.Burstiness > 1, "--burstiness must be above 1 (1 is Poisson).");
        var random = new Random(settings.Seed);
        // Gamma gaps with shape k = 1/cv² and rate k·λ have mean 1/λ and coefficient of variation cv.
        IContinuousDistribution gaps = settings.Arrivals == ArrivalProcess.Poisson
            ? new Exponential(settings.RatePerSecond, random)
            : new Gamma(1 / (settings.Burstiness * settings.Burstiness), settings.RatePerSecond / (settings.Burstiness * settings.Burstiness), random);
        var total = settings.Mix.Sum(b => b.Share);
        var requests = new List<TraceRequest>(settings.Requests);
        var time = 0.0;
        for (var i = 0; i < settings.Requests; i++)
        {
            if (i > 0)
            {
                time += gaps.Sample();
            }
            var pick = random.NextDouble() * total;
            var bucket = settings.Mix[^1];
            foreach (var candidate in settings.Mix)
            {
                if (pick < candidate.Share)
                {
                    bucket = candidate;
                    break;
                }
                pick -= candidate.Share;
            }
            var context = random.Next(bucket.MinTokens, bucket.MaxTokens + 1);
            var output = random.Next(Math.Max(1, settings.OutputTokens / 2), settings.OutputTokens * 3 / 2 + 1);
            requests.Add(new TraceRequest(time, context, output));
        }
        return requests;
    }

    /// <summary>
    /// Fits a trace to a model and a machine: prompt lengths × <paramref name="lengthScale"/>, arrivals ÷
    /// <paramref name="speedup"/>, outputs capped, and prompt + output kept within the context window.
    /// </summary>
    public static IReadOnlyList<TraceRequest> Scale(IReadOnlyList<TraceRequest> trace, double lengthScale, double speedup, int maxOutputTokens, int contextLength)
    {
        ArgumentNullException.ThrowIfNull(trace);
        Require(lengthScale > 0 && double.IsFinite(lengthScale), "--length-scale must be positive.");
        Require(speedup > 0 && double.IsFinite(speedup), "--speedup must be positive.");
        Require(maxOutputTokens > 0, "--max-output-tokens must be positive.");
        Require(contextLength > maxOutputTokens, $"the context window ({contextLength}) must be longer than --max-output-tokens ({maxOutputTokens}).");
        return [.. trace.Select(r =>
        {
            var output = Math.Clamp(r.GeneratedTokens, 1, maxOutputTokens);
            var context = Math.Clamp((int)Math.Round(r.ContextTokens * lengthScale), 1, contextLength - output);
            return new TraceRequest(r.ArrivalSeconds / speedup, context, output);
        })];
    }

    /// <summary>The paper's mix with every length × scale (at least 1 token).</summary>
    public static IReadOnlyList<LengthBucket> ScaledPaperMix(double scale) =>
        [.. PaperMix.Select(b => new LengthBucket(Math.Max(1, (int)(b.MinTokens * scale)), Math.Max(1, (int)(b.MaxTokens * scale)), b.Share))];

    /// <summary>The timestamp in ticks (100 ns): exact for date-times, whose seconds since year 1 overflow a double's precision.</summary>
    private static long Time(string? text, string source, int line)
    {
        if (double.TryParse(text, NumberStyles.Float, CultureInfo.InvariantCulture, out var seconds) && double.IsFinite(seconds) && Math.Abs(seconds) < 1e11)
        {
            return (long)Math.Round(seconds * TimeSpan.TicksPerSecond);
        }
        if (DateTime.TryParse(text, CultureInfo.InvariantCulture, DateTimeStyles.AdjustToUniversal | DateTimeStyles.AssumeUniversal, out var time))
        {
            return time.Ticks;
        }
        throw new FormatException($"{source} line {line}: TIMESTAMP '{text}' is neither a date-time nor a number of seconds.");
    }

    private static int Count(string? text, string column, string source, int line) =>
        int.TryParse(text, NumberStyles.Integer, CultureInfo.InvariantCulture, out var value) && value >= 0
            ? value
            : throw new FormatException($"{source} line {line}: {column} '{text}' is not a non-negative integer.");

    private static void Require(bool condition, string message)
    {
        if (!condition)
        {
            throw new ArgumentException(message);
        }
    }
}

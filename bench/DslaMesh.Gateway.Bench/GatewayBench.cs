using System.Diagnostics;
using System.Globalization;
using System.Net;
using System.Net.Sockets;
using System.Runtime.InteropServices;
using System.Text;
using System.Text.Json;
using DslaMesh.Gateway.Discovery;
using DslaMesh.Protos.V1;
using Grpc.Core;
using Grpc.Net.Client;
using Yarp.ReverseProxy;

namespace DslaMesh.Gateway.Bench;

/// <summary>
/// Gateway overhead on loopback: the same streams (SSE over HTTP/1.1, gRPC over h2c) sent straight to a replica and
/// through the gateway, at 1 to 256 concurrent streams, each cell bounded in time and count. Prints a table and writes
/// JSON.
/// <code>dotnet run -c Release --project bench/DslaMesh.Gateway.Bench -- [--concurrency 1,4,16,64,256] [--seconds 3]
///     [--chunks 16] [--token-interval-ms 0] [--out docs/benchmarks/gateway-overhead.json]</code>
/// </summary>
/// <remarks>
/// The stub replica stamps every chunk with the time it wrote it (client, gateway and replica share one process and
/// one clock), so besides whole-request latency the client measures time to first chunk and each chunk's delivery
/// time, replica write to client read. With <c>--token-interval-ms 0</c> the replica writes all chunks at once and the
/// cells measure saturation (maximum requests/s); with an interval it paces tokens the way a model does, and the
/// per-token delivery time is the latency a streaming client sees added by the gateway at that many live streams.
/// </remarks>
public static class GatewayBench
{
    private const string Key = "bench-key-0123456789abcdef";
    private const int MaxRequestsPerCell = 200_000;
    private static readonly JsonSerializerOptions ReportJson = new() { WriteIndented = true, PropertyNamingPolicy = JsonNamingPolicy.SnakeCaseLower };

    /// <summary>Runs the benchmark; returns the process exit code.</summary>
    public static async Task<int> RunAsync(string[] args)
    {
        var concurrency = Arg(args, "--concurrency", "1,4,16,64,256").Split(',').Select(int.Parse).ToArray();
        var seconds = double.Parse(Arg(args, "--seconds", "3"), CultureInfo.InvariantCulture);
        var chunks = int.Parse(Arg(args, "--chunks", "16"), CultureInfo.InvariantCulture);
        var interval = double.Parse(Arg(args, "--token-interval-ms", "0"), CultureInfo.InvariantCulture);
        var output = Arg(args, "--out", Path.Combine("docs", "benchmarks", "gateway-overhead.json"));
        if (concurrency.Any(c => c is < 1 or > 256) || seconds is <= 0 or > 30 || chunks is < 1 or > 1000 || interval is < 0 or > 1000)
        {
            await Console.Error.WriteLineAsync("--concurrency 1..256, --seconds (0, 30], --chunks 1..1000, --token-interval-ms 0..1000");
            return 2;
        }

        using var redis = StartRedis(out var redisPort);
        // Declared before the replica and the gateway, so disposed after them: they still talk to Redis while stopping.
        using var stopRedis = new RedisStopper(redis);
        var configuration = $"127.0.0.1:{redisPort}";
        await WaitForRedisAsync(configuration);
        await using var stub = await StubReplica.StartAsync(configuration, "bench", FreePort(), FreePort(), chunks, TimeSpan.FromMilliseconds(interval));
        var (gateway, gatewayHttp, gatewayGrpc) = await StartGatewayAsync(configuration);
        await using var gatewayApp = gateway;

        using var directHttp = Client(stub.Registration.Address);
        using var viaHttp = Client(gatewayHttp);
        using var directChannel = Channel(stub.Registration.GrpcAddress);
        using var viaChannel = Channel(gatewayGrpc);
        var targets = new (string Target, string Protocol, Func<CancellationToken, Task<Sample>> Send)[]
        {
            ("direct", "sse", ct => SseAsync(directHttp, ct)),
            ("gateway", "sse", ct => SseAsync(viaHttp, ct)),
            ("direct", "grpc", ct => GrpcAsync(new Generation.GenerationClient(directChannel), ct)),
            ("gateway", "grpc", ct => GrpcAsync(new Generation.GenerationClient(viaChannel), ct)),
        };

        var pacing = interval > 0 ? $"one token every {interval:F0} ms" : "all tokens at once";
        Console.WriteLine($"Gateway overhead, loopback, {Environment.ProcessorCount} cores, {chunks} chunks per stream ({pacing}), {seconds:F1} s per cell (client, gateway and replica share the machine)");
        var cells = new List<Cell>();
        foreach (var c in concurrency)
        {
            foreach (var (target, protocol, send) in targets)
            {
                await MeasureAsync(send, c, TimeSpan.FromSeconds(Math.Min(0.5, seconds / 4)));   // warm-up: connections, JIT
                var cell = await MeasureAsync(send, c, TimeSpan.FromSeconds(seconds));
                cells.Add(cell with { Target = target, Protocol = protocol });
                Console.Error.WriteLine($"{protocol} {target,-7} {c,3} streams: {cell.RequestsPerSecond,8:F0} req/s, p50 {cell.P50Ms:F3} ms, first chunk p50 {cell.FirstChunk.P50:F3} ms, delivery p50 {cell.Delivery.P50:F3} ms");
            }
        }

        var summary = cells.GroupBy(c => (c.Protocol, c.Concurrency)).Select(g =>
        {
            var direct = g.Single(c => c.Target == "direct");
            var via = g.Single(c => c.Target == "gateway");
            return new Overhead(g.Key.Protocol, g.Key.Concurrency, via.P50Ms - direct.P50Ms, via.P99Ms - direct.P99Ms, direct.RequestsPerSecond, via.RequestsPerSecond, direct.P50Ms, via.P50Ms, direct.P99Ms, via.P99Ms,
                via.FirstChunk.P50 - direct.FirstChunk.P50, via.FirstChunk.P99 - direct.FirstChunk.P99, via.Delivery.P50 - direct.Delivery.P50, via.Delivery.P99 - direct.Delivery.P99);
        }).ToList();
        var table = Table(summary) + Environment.NewLine + StreamingTable(cells);
        Console.WriteLine(table);
        foreach (var protocol in new[] { "sse", "grpc" })
        {
            var mine = cells.Where(c => c.Protocol == protocol).ToList();
            Console.WriteLine($"max req/s {protocol}: direct {mine.Where(c => c.Target == "direct").Max(c => c.RequestsPerSecond):F0}, gateway {mine.Where(c => c.Target == "gateway").Max(c => c.RequestsPerSecond):F0}");
        }

        var report = new
        {
            benchmark = "gateway-overhead",
            date = DateTimeOffset.UtcNow,
            machine = new { cores = Environment.ProcessorCount, os = RuntimeInformation.OSDescription, runtime = RuntimeInformation.FrameworkDescription },
            settings = new { concurrency, seconds_per_cell = seconds, chunks_per_stream = chunks, token_interval_ms = interval, backend = interval > 0 ? $"stub replica (one token every {interval} ms)" : "stub replica (instant tokens)", max_requests_per_cell = MaxRequestsPerCell },
            summary = summary.Select(s => new
            {
                s.Protocol, s.Concurrency, added_p50_ms = s.AddedP50Ms, added_p99_ms = s.AddedP99Ms, direct_rps = s.DirectRps, gateway_rps = s.GatewayRps, direct_p50_ms = s.DirectP50Ms, gateway_p50_ms = s.GatewayP50Ms,
                direct_p99_ms = s.DirectP99Ms, gateway_p99_ms = s.GatewayP99Ms, added_first_chunk_p50_ms = s.AddedFirstChunkP50Ms, added_first_chunk_p99_ms = s.AddedFirstChunkP99Ms,
                added_delivery_p50_ms = s.AddedDeliveryP50Ms, added_delivery_p99_ms = s.AddedDeliveryP99Ms,
            }),
            cells = cells.Select(c => new
            {
                c.Target, c.Protocol, c.Concurrency, c.Requests, c.Errors, rps = c.RequestsPerSecond, p50_ms = c.P50Ms, p90_ms = c.P90Ms, p99_ms = c.P99Ms,
                first_chunk_p50_ms = c.FirstChunk.P50, first_chunk_p99_ms = c.FirstChunk.P99, delivery_p50_ms = c.Delivery.P50, delivery_p99_ms = c.Delivery.P99, chunks = c.Delivery.Count,
            }),
            table,
        };
        Directory.CreateDirectory(Path.GetDirectoryName(Path.GetFullPath(output))!);
        await File.WriteAllTextAsync(output, JsonSerializer.Serialize(report, ReportJson));
        Console.WriteLine($"wrote {output}");
        return cells.Any(c => c.Errors > 0) ? 1 : 0;
    }

    private static async Task<Cell> MeasureAsync(Func<CancellationToken, Task<Sample>> send, int concurrency, TimeSpan duration)
    {
        using var stop = new CancellationTokenSource(duration);
        var count = 0;
        var errors = 0;
        var watch = Stopwatch.StartNew();
        var workers = Enumerable.Range(0, concurrency).Select(_ => Task.Run(async () =>
        {
            var samples = new List<Sample>(1024);
            while (!stop.IsCancellationRequested && Interlocked.Increment(ref count) <= MaxRequestsPerCell)
            {
                try
                {
                    samples.Add(await send(CancellationToken.None));
                }
                catch (Exception e) when (e is HttpRequestException or RpcException or IOException or InvalidOperationException)
                {
                    Interlocked.Increment(ref errors);
                }
            }
            return samples;
        })).ToArray();
        var samples = (await Task.WhenAll(workers)).SelectMany(l => l).ToArray();
        var elapsed = watch.Elapsed.TotalSeconds;
        var all = samples.Select(s => s.TotalMs).Order().ToArray();
        return new Cell("", "", concurrency, all.Length, errors, all.Length / elapsed, Percentile(all, 0.5), Percentile(all, 0.9), Percentile(all, 0.99),
            Distribution.Of(samples.Select(s => s.FirstChunkMs)), Distribution.Of(samples.SelectMany(s => s.DeliveryMs)));
    }

    /// <summary>Milliseconds from a replica's timestamp (Stopwatch ticks in the chunk's text, <c>" t123…"</c>) to now.</summary>
    private static double DeliveryMs(string text, long received)
    {
        var at = text.IndexOf(" t", StringComparison.Ordinal);
        var end = at + 2;
        while (end < text.Length && char.IsAsciiDigit(text[end]))
        {
            end++;
        }
        return at >= 0 && long.TryParse(text.AsSpan(at + 2, end - at - 2), NumberStyles.None, CultureInfo.InvariantCulture, out var sent)
            ? (received - sent) * 1000.0 / Stopwatch.Frequency
            : throw new InvalidOperationException($"chunk without a timestamp: '{text}'");
    }

    private static async Task<Sample> SseAsync(HttpClient http, CancellationToken ct)
    {
        var started = Stopwatch.GetTimestamp();
        using var request = new HttpRequestMessage(HttpMethod.Post, "/v1/completions")
        {
            Content = new StringContent("{\"prompt\":\"The quick brown fox\",\"max_tokens\":16,\"stream\":true}", Encoding.UTF8, "application/json"),
        };
        using var response = await http.SendAsync(request, HttpCompletionOption.ResponseHeadersRead, ct);
        if (response.StatusCode != HttpStatusCode.OK)
        {
            throw new HttpRequestException($"status {(int)response.StatusCode}");
        }
        await using var body = await response.Content.ReadAsStreamAsync(ct);
        using var reader = new StreamReader(body, Encoding.UTF8);
        var deliveries = new List<double>(16);
        double? first = null;
        while (await reader.ReadLineAsync(ct) is { } line)
        {
            if (line.StartsWith("data: {", StringComparison.Ordinal))
            {
                var now = Stopwatch.GetTimestamp();
                first ??= Stopwatch.GetElapsedTime(started, now).TotalMilliseconds;
                deliveries.Add(DeliveryMs(line, now));
            }
        }
        return new Sample(Stopwatch.GetElapsedTime(started).TotalMilliseconds, first ?? double.NaN, deliveries);
    }

    private static async Task<Sample> GrpcAsync(Generation.GenerationClient client, CancellationToken ct)
    {
        var started = Stopwatch.GetTimestamp();
        var request = new GenerateRequest { Prompt = "The quick brown fox", Sampling = new SamplingParams { MaxTokens = 16 } };
        using var call = client.Generate(request, new Metadata { { "authorization", $"Bearer {Key}" } }, cancellationToken: ct);
        var deliveries = new List<double>(16);
        double? first = null;
        await foreach (var message in call.ResponseStream.ReadAllAsync(ct))
        {
            if (message.Completion is null)
            {
                var now = Stopwatch.GetTimestamp();
                first ??= Stopwatch.GetElapsedTime(started, now).TotalMilliseconds;
                deliveries.Add(DeliveryMs(message.Text, now));
            }
        }
        return new Sample(Stopwatch.GetElapsedTime(started).TotalMilliseconds, first ?? double.NaN, deliveries);
    }

    private static async Task<(WebApplication App, string Http, string Grpc)> StartGatewayAsync(string redis)
    {
        var builder = WebApplication.CreateBuilder();
        builder.Logging.ClearProviders();
        var http = FreePort();
        var grpc = FreePort();
        builder.Configuration.AddInMemoryCollection(new Dictionary<string, string?>
        {
            ["Kestrel:Endpoints:Http:Url"] = $"http://127.0.0.1:{http}",
            ["Kestrel:Endpoints:Http:Protocols"] = "Http1",
            ["Kestrel:Endpoints:Grpc:Url"] = $"http://127.0.0.1:{grpc}",
            ["Kestrel:Endpoints:Grpc:Protocols"] = "Http2",
            ["Redis:Configuration"] = redis,
            ["Redis:Prefix"] = "bench",
            ["Gateway:ApiKeys:0:Name"] = "bench",
            ["Gateway:ApiKeys:0:Key"] = Key,
            ["Gateway:RateLimit:RequestsPerSecond"] = "0",
            ["Gateway:RateLimit:MaxConcurrentRequests"] = "0",
        });
        builder.AddGateway();
        var app = builder.Build();
        app.MapGateway();
        await app.StartAsync();
        var lookup = app.Services.GetRequiredService<IProxyStateLookup>();
        var deadline = Stopwatch.StartNew();
        while (!(lookup.TryGetCluster(FleetProxyConfigProvider.GrpcCluster, out var cluster) && cluster.Destinations.Count == 1))
        {
            if (deadline.Elapsed > TimeSpan.FromSeconds(30))
            {
                throw new TimeoutException("the gateway never saw the stub replica");
            }
            await Task.Delay(20);
        }
        return (app, $"http://127.0.0.1:{http}", $"http://127.0.0.1:{grpc}");
    }

    private static HttpClient Client(string address)
    {
        var client = new HttpClient(new SocketsHttpHandler { MaxConnectionsPerServer = int.MaxValue, PooledConnectionLifetime = Timeout.InfiniteTimeSpan })
        {
            BaseAddress = new Uri(address),
            Timeout = TimeSpan.FromSeconds(60),
        };
        client.DefaultRequestHeaders.Authorization = new System.Net.Http.Headers.AuthenticationHeaderValue("Bearer", Key);
        return client;
    }

    private static GrpcChannel Channel(string address) =>
        GrpcChannel.ForAddress(address, new GrpcChannelOptions { HttpHandler = new SocketsHttpHandler { EnableMultipleHttp2Connections = true } });

    private static string Table(IReadOnlyList<Overhead> rows)
    {
        var text = new StringBuilder();
        text.AppendLine("| protocol | streams | direct p50 ms | gateway p50 ms | added p50 ms | direct p99 ms | gateway p99 ms | added p99 ms | direct req/s | gateway req/s |");
        text.AppendLine("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        foreach (var r in rows.OrderBy(r => r.Protocol, StringComparer.Ordinal).ThenBy(r => r.Concurrency))
        {
            text.AppendLine(CultureInfo.InvariantCulture, $"| {r.Protocol} | {r.Concurrency} | {r.DirectP50Ms:F3} | {r.GatewayP50Ms:F3} | {r.AddedP50Ms:F3} | {r.DirectP99Ms:F3} | {r.GatewayP99Ms:F3} | {r.AddedP99Ms:F3} | {r.DirectRps:F0} | {r.GatewayRps:F0} |");
        }
        return text.ToString();
    }

    private static string StreamingTable(IReadOnlyList<Cell> cells)
    {
        var text = new StringBuilder();
        text.AppendLine("| protocol | streams | first chunk p50 ms direct / gateway | added | per-token delivery p50 ms direct / gateway | added p50 | delivery p99 ms direct / gateway | added p99 |");
        text.AppendLine("|---|---:|---:|---:|---:|---:|---:|---:|");
        foreach (var g in cells.GroupBy(c => (c.Protocol, c.Concurrency)).OrderBy(g => g.Key.Protocol, StringComparer.Ordinal).ThenBy(g => g.Key.Concurrency))
        {
            var (d, v) = (g.Single(c => c.Target == "direct"), g.Single(c => c.Target == "gateway"));
            text.AppendLine(CultureInfo.InvariantCulture, $"| {g.Key.Protocol} | {g.Key.Concurrency} | {d.FirstChunk.P50:F3} / {v.FirstChunk.P50:F3} | {v.FirstChunk.P50 - d.FirstChunk.P50:F3} | {d.Delivery.P50:F3} / {v.Delivery.P50:F3} | {v.Delivery.P50 - d.Delivery.P50:F3} | {d.Delivery.P99:F3} / {v.Delivery.P99:F3} | {v.Delivery.P99 - d.Delivery.P99:F3} |");
        }
        return text.ToString();
    }

    private static double Percentile(double[] sorted, double q) =>
        sorted.Length == 0 ? double.NaN : sorted[Math.Min(sorted.Length - 1, (int)Math.Ceiling(q * sorted.Length) - 1)];

    private static string Arg(string[] args, string name, string fallback)
    {
        var i = Array.IndexOf(args, name);
        return i >= 0 && i + 1 < args.Length ? args[i + 1] : fallback;
    }

    private static int FreePort()
    {
        using var listener = new TcpListener(IPAddress.Loopback, 0);
        listener.Start();
        return ((IPEndPoint)listener.LocalEndpoint).Port;
    }

    /// <summary>Kills the benchmark's redis-server when disposed.</summary>
    private sealed class RedisStopper(Process redis) : IDisposable
    {
        public void Dispose()
        {
            try
            {
                redis.Kill();
            }
            catch (InvalidOperationException)
            {
                // Already gone.
            }
        }
    }

    private static Process StartRedis(out int port)
    {
        port = FreePort();
        var start = new ProcessStartInfo("redis-server", ["--port", port.ToString(CultureInfo.InvariantCulture), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        {
            RedirectStandardOutput = true,
            RedirectStandardError = true,
        };
        var process = Process.Start(start) ?? throw new InvalidOperationException("redis-server did not start (run deploy/scripts/install-prerequisites.sh)");
        process.OutputDataReceived += (_, _) => { };
        process.ErrorDataReceived += (_, _) => { };
        process.BeginOutputReadLine();
        process.BeginErrorReadLine();
        return process;
    }

    private static async Task WaitForRedisAsync(string configuration)
    {
        var deadline = Stopwatch.StartNew();
        while (true)
        {
            try
            {
                await using var connection = await StackExchange.Redis.ConnectionMultiplexer.ConnectAsync($"{configuration},connectTimeout=500");
                return;
            }
            catch (StackExchange.Redis.RedisConnectionException) when (deadline.Elapsed < TimeSpan.FromSeconds(10))
            {
                await Task.Delay(50);
            }
        }
    }

    /// <summary>One stream: whole-request time, time to its first chunk, and each chunk's delivery time (ms).</summary>
    private sealed record Sample(double TotalMs, double FirstChunkMs, IReadOnlyList<double> DeliveryMs);

    /// <summary>Median and 99th percentile of a set of milliseconds.</summary>
    private sealed record Distribution(int Count, double P50, double P99)
    {
        public static Distribution Of(IEnumerable<double> values)
        {
            var sorted = values.Where(v => !double.IsNaN(v)).Order().ToArray();
            return new Distribution(sorted.Length, Percentile(sorted, 0.5), Percentile(sorted, 0.99));
        }
    }

    private sealed record Cell(string Target, string Protocol, int Concurrency, int Requests, int Errors, double RequestsPerSecond, double P50Ms, double P90Ms, double P99Ms, Distribution FirstChunk, Distribution Delivery);

    private sealed record Overhead(string Protocol, int Concurrency, double AddedP50Ms, double AddedP99Ms, double DirectRps, double GatewayRps, double DirectP50Ms, double GatewayP50Ms, double DirectP99Ms, double GatewayP99Ms,
        double AddedFirstChunkP50Ms, double AddedFirstChunkP99Ms, double AddedDeliveryP50Ms, double AddedDeliveryP99Ms);
}

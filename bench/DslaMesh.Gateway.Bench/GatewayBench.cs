using System.Diagnostics;
using System.Globalization;
using System.Net;
using System.Net.Sockets;
using System.Runtime.InteropServices;
using System.Text;
using System.Text.Json;
using DslaMesh.Fleet;
using DslaMesh.Gateway.Discovery;
using DslaMesh.Protos.V1;
using Grpc.Core;
using Grpc.Net.Client;
using Yarp.ReverseProxy;

namespace DslaMesh.Gateway.Bench;

/// <summary>
/// Gateway overhead on loopback: the same streams (SSE over HTTP/1.1, gRPC over h2c) sent straight to a replica and
/// through the gateway, at 1 to 256 concurrent streams, each cell bounded in time and count. Prints a table and writes
/// JSON. <see cref="Usage"/> lists the options.
/// </summary>
/// <remarks>
/// The stub replica stamps every chunk with the time it wrote it (Stopwatch ticks: one monotonic clock for the whole
/// machine on Linux, so this holds across processes too), so besides whole-request latency the client measures time
/// to first chunk and each chunk's delivery time, replica write to client read. With <c>--token-interval-ms 0</c> the
/// replica writes all chunks at once and the cells measure saturation (maximum requests/s); with an interval it paces
/// tokens the way a model does, and the per-token delivery time is the latency a streaming client sees added by the
/// gateway at that many live streams.
/// <para>By default client, gateway and stub share one process. With <c>--processes</c> the stub and the gateway each
/// run as their own process (this executable with <c>--role replica</c> / <c>--role gateway</c>, real Kestrel hosts on
/// loopback; the gateway built as the deployed one is), optionally each on its own CPUs.</para>
/// </remarks>
public static class GatewayBench
{
    /// <summary>Command-line help.</summary>
    public const string Usage = """
        usage: DslaMesh.Gateway.Bench [--concurrency 1,4,16,64,256] [--seconds 3] [--chunks 16] [--token-interval-ms 0]
                                      [--out docs/benchmarks/gateway-overhead.json]
                                      [--processes] [--client-cpus LIST] [--gateway-cpus LIST] [--replica-cpus LIST]
                                      [--registry auto|redis|static] [--gateway-logging product|off] [--gateway-h2-streams N]
          --processes        the stub replica and the gateway run as separate processes (default: all in this one)
          --client-cpus      CPUs of the client (this bench, re-run pinned; in-process mode: of everything), e.g. 0-3
          --gateway-cpus     CPUs of the gateway process (and of redis-server), e.g. 4-11   (needs --processes)
          --replica-cpus     CPUs of the stub replica process, e.g. 12-15                   (needs --processes)
                             CPU lists as taskset -c takes them (0-3,8,10-11); Linux only; pinned from process start
          --registry         redis: the gateway discovers the stub in a redis-server the bench starts (as deployed);
                             static: the gateway is given the stub's address, no Redis needed;
                             auto (default): redis when redis-server is on PATH, else static
          --gateway-logging  product: the gateway host as deployed (its appsettings.json: console logging, log levels);
                             off: logging providers cleared. Default: product with --processes, off in-process
          --gateway-h2-streams  experiment: the gateway's HTTP/2 streams per client connection (product: 1000;
                             Kestrel's default, and the replicas', is 100)
        """;

    private const string Key = BenchGateway.Key;
    private const int MaxRequestsPerCell = 200_000;
    private static readonly JsonSerializerOptions ReportJson = new() { WriteIndented = true, PropertyNamingPolicy = JsonNamingPolicy.SnakeCaseLower };

    /// <summary>Runs the benchmark (or one of its process roles); returns the process exit code.</summary>
    public static async Task<int> RunAsync(string[] args)
    {
        ArgumentNullException.ThrowIfNull(args);
        switch (Arg(args, "--role", ""))
        {
            case "":
                break;
            case "replica":
                return await BenchRoles.ReplicaAsync(args);
            case "gateway":
                return await BenchRoles.GatewayAsync(args);
            case var role:
                await Console.Error.WriteLineAsync($"unknown --role {role} (replica, gateway)");
                return 2;
        }
        if (args.Contains("--help") || args.Contains("-h"))
        {
            Console.WriteLine(Usage);
            return 0;
        }

        int[] concurrency;
        double seconds, interval;
        int chunks;
        int? h2Streams;
        CpuSet? clientCpus, gatewayCpus, replicaCpus;
        try
        {
            concurrency = Arg(args, "--concurrency", "1,4,16,64,256").Split(',').Select(c => int.Parse(c, CultureInfo.InvariantCulture)).ToArray();
            seconds = double.Parse(Arg(args, "--seconds", "3"), CultureInfo.InvariantCulture);
            chunks = int.Parse(Arg(args, "--chunks", "16"), CultureInfo.InvariantCulture);
            interval = double.Parse(Arg(args, "--token-interval-ms", "0"), CultureInfo.InvariantCulture);
            clientCpus = CpuArg(args, "--client-cpus");
            gatewayCpus = CpuArg(args, "--gateway-cpus");
            replicaCpus = CpuArg(args, "--replica-cpus");
            h2Streams = Arg(args, "--gateway-h2-streams", "") is { Length: > 0 } streams ? int.Parse(streams, NumberStyles.None, CultureInfo.InvariantCulture) : null;
        }
        catch (FormatException e)
        {
            await Console.Error.WriteLineAsync($"{e.Message}{Environment.NewLine}{Usage}");
            return 2;
        }
        var output = Arg(args, "--out", Path.Combine("docs", "benchmarks", "gateway-overhead.json"));
        var processes = args.Contains("--processes");
        var registry = Arg(args, "--registry", "auto");
        var gatewayLogging = Arg(args, "--gateway-logging", processes ? "product" : "off");
        if (concurrency.Any(c => c is < 1 or > 256) || seconds is <= 0 or > 30 || chunks is < 1 or > 1000 || interval is < 0 or > 1000
            || registry is not ("auto" or "redis" or "static") || gatewayLogging is not ("product" or "off") || h2Streams is < 1)
        {
            await Console.Error.WriteLineAsync("--concurrency 1..256, --seconds (0, 30], --chunks 1..1000, --token-interval-ms 0..1000, --registry auto|redis|static, --gateway-logging product|off, --gateway-h2-streams >= 1");
            return 2;
        }
        if (!processes && (gatewayCpus is not null || replicaCpus is not null))
        {
            await Console.Error.WriteLineAsync("--gateway-cpus and --replica-cpus need --processes (in one process, --client-cpus pins everything)");
            return 2;
        }
        if ((clientCpus ?? gatewayCpus ?? replicaCpus) is not null)
        {
            if (!OperatingSystem.IsLinux())
            {
                await Console.Error.WriteLineAsync("CPU lists need Linux");
                return 2;
            }
            // Checked before the client is pinned (the pinned copy's own mask is the client's CPUs only).
            var allowed = Environment.GetEnvironmentVariable(BenchRoles.PinnedVariable) == "1" ? null : Affinity.Current();
            foreach (var (name, set) in new[] { ("--client-cpus", clientCpus), ("--gateway-cpus", gatewayCpus), ("--replica-cpus", replicaCpus) })
            {
                if (set is not null && allowed is not null && set.Cpus.Except(allowed.Cpus).Any())
                {
                    await Console.Error.WriteLineAsync($"{name} {set}: CPUs {string.Join(',', set.Cpus.Except(allowed.Cpus))} are not available here (allowed: {allowed})");
                    return 2;
                }
            }
        }
        if (clientCpus is not null && Environment.GetEnvironmentVariable(BenchRoles.PinnedVariable) != "1")
        {
            // The client is pinned from its first instruction too: the bench runs again on those CPUs.
            return await BenchRoles.SuperviseAsync(args, clientCpus);
        }
        if (processes && clientCpus is not null && Environment.GetEnvironmentVariable(BenchRoles.UnpinnedCpusVariable) is { Length: > 0 } unpinned)
        {
            // This copy runs on the client's CPUs; children given no list run where the bench was started, not here.
            var all = CpuSet.Parse(unpinned);
            gatewayCpus ??= all;
            replicaCpus ??= all;
        }
        if (registry == "auto")
        {
            registry = BenchRoles.OnPath("redis-server") ? "redis" : "static";
            if (registry == "static")
            {
                Console.Error.WriteLine("redis-server is not on PATH: the gateway is given the stub's address (--registry static)");
            }
        }

        // Children die with this process: on Ctrl-C/SIGTERM, at exit, and (through their closed stdin) if it is killed.
        AppDomain.CurrentDomain.ProcessExit += (_, _) => ChildProcess.KillAll();
        using var interrupt = PosixSignalRegistration.Create(PosixSignal.SIGINT, _ => ChildProcess.KillAll());
        using var terminate = PosixSignalRegistration.Create(PosixSignal.SIGTERM, _ => ChildProcess.KillAll());

        // Disposed last: the replica and the gateway still talk to Redis while stopping.
        var redisPort = FreePort();
        await using var redis = registry == "redis" ? StartRedis(processes ? gatewayCpus : null, redisPort) : null;
        var redisConfiguration = redis is null ? null : $"127.0.0.1:{redisPort}";
        if (redis is not null)
        {
            await WaitForRedisAsync(redis, redisConfiguration!);
        }
        await using var running = await (processes
            ? StartProcessesAsync(redisConfiguration, chunks, interval, gatewayCpus, replicaCpus, gatewayLogging, h2Streams)
            : StartInProcessAsync(redisConfiguration, chunks, interval, gatewayLogging, h2Streams));

        using var directHttp = Client(running.ReplicaHttp);
        using var viaHttp = Client(running.GatewayHttp);
        using var directChannel = Channel(running.ReplicaGrpc);
        using var viaChannel = Channel(running.GatewayGrpc);
        var targets = new (string Target, string Protocol, Func<CancellationToken, Task<Sample>> Send)[]
        {
            ("direct", "sse", ct => SseAsync(directHttp, ct)),
            ("gateway", "sse", ct => SseAsync(viaHttp, ct)),
            ("direct", "grpc", ct => GrpcAsync(new Generation.GenerationClient(directChannel), ct)),
            ("gateway", "grpc", ct => GrpcAsync(new Generation.GenerationClient(viaChannel), ct)),
        };
        foreach (var (target, protocol, send) in targets)
        {
            try
            {
                await send(CancellationToken.None);
            }
            catch (Exception e) when (e is HttpRequestException or RpcException or IOException or InvalidOperationException)
            {
                throw new InvalidOperationException($"a first {protocol} request {target} failed: {e.Message}{running.Tails()}", e);
            }
        }

        // The CPUs the bench was started with (before --client-cpus pinned it), and the machine's online CPUs.
        var startCpus = Environment.GetEnvironmentVariable(BenchRoles.UnpinnedCpusVariable) is { Length: > 0 } started ? CpuSet.Parse(started)
            : OperatingSystem.IsLinux() ? Affinity.Current() : null;
        var machineCores = startCpus?.Cpus.Count ?? Environment.ProcessorCount;
        var cpus = running.Cpus();
        var pacing = interval > 0 ? $"one token every {interval:F0} ms" : "all tokens at once";
        var where = processes
            ? $"client, gateway and replica in separate processes (CPUs: client {cpus.Client}, gateway {cpus.Gateway}, replica {cpus.Replica})"
            : $"client, gateway and replica in one process (CPUs {cpus.Client})";
        var experiment = h2Streams is null ? "" : $", gateway HTTP/2 streams per connection {h2Streams} (experiment)";
        var header = $"Gateway overhead, loopback, {machineCores} cores, {where}, registry {registry}, gateway logging {gatewayLogging}{experiment}, {chunks} chunks per stream ({pacing}), {seconds:F1} s per cell";
        Console.WriteLine(header);
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
            running.ThrowIfExited();
        }

        var summary = cells.GroupBy(c => (c.Protocol, c.Concurrency)).Select(g =>
        {
            var direct = g.Single(c => c.Target == "direct");
            var via = g.Single(c => c.Target == "gateway");
            return new Overhead(g.Key.Protocol, g.Key.Concurrency, via.P50Ms - direct.P50Ms, via.P99Ms - direct.P99Ms, direct.RequestsPerSecond, via.RequestsPerSecond, direct.P50Ms, via.P50Ms, direct.P99Ms, via.P99Ms,
                via.FirstChunk.P50 - direct.FirstChunk.P50, via.FirstChunk.P99 - direct.FirstChunk.P99, via.Delivery.P50 - direct.Delivery.P50, via.Delivery.P99 - direct.Delivery.P99);
        }).ToList();
        var table = header + Environment.NewLine + Environment.NewLine + Table(summary) + Environment.NewLine + StreamingTable(cells);
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
            machine = new { cores = machineCores, cpus = startCpus?.ToString(), online_cpus = Affinity.MachineCores(), client_cores = Environment.ProcessorCount, os = RuntimeInformation.OSDescription, runtime = RuntimeInformation.FrameworkDescription },
            settings = new
            {
                concurrency, seconds_per_cell = seconds, chunks_per_stream = chunks, token_interval_ms = interval, backend = interval > 0 ? $"stub replica (one token every {interval} ms)" : "stub replica (instant tokens)", max_requests_per_cell = MaxRequestsPerCell,
                mode = processes ? "processes" : "in-process", registry, gateway_logging = gatewayLogging, gateway_h2_streams_per_connection = h2Streams ?? 1000,
                cpus = new { client = cpus.Client, gateway = cpus.Gateway, replica = cpus.Replica, redis = redis?.Cpus },
                requested_cpus = new { client = clientCpus?.ToString(), gateway = gatewayCpus?.ToString(), replica = replicaCpus?.ToString() },
            },
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

    /// <summary>Stub replica and gateway in this process (the default mode).</summary>
    private static async Task<Running> StartInProcessAsync(string? redis, int chunks, double interval, string gatewayLogging, int? h2Streams)
    {
        var stub = await StubReplica.StartAsync(redis, "bench", FreePort(), FreePort(), chunks, TimeSpan.FromMilliseconds(interval));
        try
        {
            var (gateway, gatewayHttp, gatewayGrpc) = await StartGatewayAsync(redis, redis is null ? stub.Registration : null, gatewayLogging == "product", h2Streams);
            return new Running(stub.Registration.Address, stub.Registration.GrpcAddress, gatewayHttp, gatewayGrpc, [gateway, stub], null, null);
        }
        catch
        {
            await stub.DisposeAsync();
            throw;
        }
    }

    /// <summary>Stub replica and gateway as processes of their own, each on its CPUs, ready when this returns.</summary>
    private static async Task<Running> StartProcessesAsync(string? redis, int chunks, double interval, CpuSet? gatewayCpus, CpuSet? replicaCpus, string gatewayLogging, int? h2Streams)
    {
        var (replicaHttp, replicaGrpc, gatewayHttp, gatewayGrpc) = (FreePort(), FreePort(), FreePort(), FreePort());
        string[] inRedis = redis is null ? [] : ["--redis", redis];
        var replica = ChildProcess.StartRole("replica", [
            "--http-port", Invariant(replicaHttp), "--grpc-port", Invariant(replicaGrpc), "--chunks", Invariant(chunks),
            "--token-interval-ms", interval.ToString(CultureInfo.InvariantCulture), .. inRedis], replicaCpus);
        ChildProcess? gateway = null;
        try
        {
            using var probe = new HttpClient { Timeout = TimeSpan.FromSeconds(2) };
            probe.DefaultRequestHeaders.Authorization = new System.Net.Http.Headers.AuthenticationHeaderValue("Bearer", Key);
            await replica.WaitUntilReadyAsync("its /health answered 200", async ct =>
                (await probe.GetAsync(new Uri($"http://127.0.0.1:{replicaHttp}/health"), ct)).StatusCode == HttpStatusCode.OK, TimeSpan.FromSeconds(60));
            gateway = ChildProcess.StartRole("gateway", [
                "--http-port", Invariant(gatewayHttp), "--grpc-port", Invariant(gatewayGrpc), "--gateway-logging", gatewayLogging,
                .. h2Streams is null ? Array.Empty<string>() : ["--gateway-h2-streams", Invariant(h2Streams.Value)],
                .. redis is null ? ["--replica-http-port", Invariant(replicaHttp), "--replica-grpc-port", Invariant(replicaGrpc)] : inRedis], gatewayCpus);
            // With Redis, /health is 200 once the registry was read and lists a replica; without, the gateway was given
            // the replica, and /v1/models lists what it routes to.
            await gateway.WaitUntilReadyAsync(redis is null ? "/v1/models listed the stub" : "its /health answered 200", async ct =>
            {
                using var health = await probe.GetAsync(new Uri($"http://127.0.0.1:{gatewayHttp}/health"), ct);
                using var models = await probe.GetAsync(new Uri($"http://127.0.0.1:{gatewayHttp}/v1/models"), ct);
                return (redis is null || health.StatusCode == HttpStatusCode.OK) && models.StatusCode == HttpStatusCode.OK
                    && (await models.Content.ReadAsStringAsync(ct)).Contains("\"stub\"", StringComparison.Ordinal);
            }, TimeSpan.FromSeconds(60));
            return new Running($"http://localhost:{replicaHttp}", $"http://localhost:{replicaGrpc}", $"http://127.0.0.1:{gatewayHttp}", $"http://127.0.0.1:{gatewayGrpc}",
                [gateway, replica], gateway, replica);
        }
        catch
        {
            if (gateway is not null)
            {
                await gateway.DisposeAsync();
            }
            await replica.DisposeAsync();
            throw;
        }
    }

    private static string Invariant(int value) => value.ToString(CultureInfo.InvariantCulture);

    private static CpuSet? CpuArg(string[] args, string name)
    {
        var text = Arg(args, name, "");
        return text.Length == 0 ? null : CpuSet.Parse(text);
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

    private static async Task<(WebApplication App, string Http, string Grpc)> StartGatewayAsync(string? redis, ServiceRegistration? staticReplica, bool productHost, int? h2Streams)
    {
        var http = FreePort();
        var grpc = FreePort();
        var app = await BenchGateway.StartAsync(http, grpc, redis, staticReplica, productHost, h2Streams);
        var lookup = app.Services.GetRequiredService<IProxyStateLookup>();
        var deadline = Stopwatch.StartNew();
        while (!(lookup.TryGetCluster(FleetProxyConfigProvider.GrpcCluster, out var cluster) && cluster.Destinations.Count == 1))
        {
            if (deadline.Elapsed > TimeSpan.FromSeconds(30))
            {
                await app.DisposeAsync();
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

    /// <summary>The value after <paramref name="name"/>, or <paramref name="fallback"/>.</summary>
    public static string Arg(string[] args, string name, string fallback)
    {
        var i = Array.IndexOf(args, name);
        return i >= 0 && i + 1 < args.Length ? args[i + 1] : fallback;
    }

    internal static int FreePort()
    {
        using var listener = new TcpListener(IPAddress.Loopback, 0);
        listener.Start();
        return ((IPEndPoint)listener.LocalEndpoint).Port;
    }

    private static ChildProcess StartRedis(CpuSet? cpus, int port)
    {
        if (!BenchRoles.OnPath("redis-server"))
        {
            throw new InvalidOperationException("redis-server is not on PATH (deploy/scripts/install-prerequisites.sh installs it; or run with --registry static)");
        }
        return ChildProcess.StartProgram("redis-server", "redis-server", ["--port", port.ToString(CultureInfo.InvariantCulture), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"], cpus);
    }

    private static async Task WaitForRedisAsync(ChildProcess redis, string configuration) =>
        await redis.WaitUntilReadyAsync("it accepted a connection", async _ =>
        {
            try
            {
                await using var connection = await StackExchange.Redis.ConnectionMultiplexer.ConnectAsync($"{configuration},connectTimeout=500");
                return true;
            }
            catch (StackExchange.Redis.RedisConnectionException)
            {
                return false;
            }
        }, TimeSpan.FromSeconds(10));

    /// <summary>
    /// Where the replica and the gateway answer, and what to stop (in order: the gateway, then the replica); in
    /// <c>--processes</c> mode the two child processes.
    /// </summary>
    private sealed class Running(string replicaHttp, string replicaGrpc, string gatewayHttp, string gatewayGrpc, IReadOnlyList<IAsyncDisposable> stopInOrder, ChildProcess? gateway, ChildProcess? replica) : IAsyncDisposable
    {
        public string ReplicaHttp => replicaHttp;

        public string ReplicaGrpc => replicaGrpc;

        public string GatewayHttp => gatewayHttp;

        public string GatewayGrpc => gatewayGrpc;

        /// <summary>The CPU lists each part runs on, as the kernel reports them.</summary>
        public (string Client, string? Gateway, string? Replica) Cpus() => (Affinity.Of(Environment.ProcessId) ?? $"{Environment.ProcessorCount} cores", gateway?.Cpus, replica?.Cpus);

        /// <summary>The child processes' last output, for an error message ("" in one process).</summary>
        public string Tails() => gateway is null || replica is null ? "" :
            $"{Environment.NewLine}gateway (pid {gateway.Process.Id}) output:{Environment.NewLine}{gateway.Tail()}{Environment.NewLine}replica (pid {replica.Process.Id}) output:{Environment.NewLine}{replica.Tail()}";

        /// <summary>Fails when a child process has ended (its output in the message).</summary>
        public void ThrowIfExited()
        {
            foreach (var child in new[] { gateway, replica })
            {
                if (child is not null && child.Process.HasExited)
                {
                    throw new InvalidOperationException($"the {child.Name} process exited with code {child.Process.ExitCode} during the run; its last output:{Environment.NewLine}{child.Tail()}");
                }
            }
        }

        public async ValueTask DisposeAsync()
        {
            foreach (var part in stopInOrder)
            {
                await part.DisposeAsync();
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

using System.Collections.Concurrent;
using System.Diagnostics;
using DslaMesh.Protos.V1;
using Grpc.Core;

namespace DslaMesh.Cli.Replay;

/// <summary>What happened to one replayed request. Times are milliseconds; seconds are from the start of the run.</summary>
public sealed record RequestRecord
{
    public int Index { get; init; }

    /// <summary>Which repetition of the trace (0 = the first) this request belongs to.</summary>
    public int Round { get; init; }

    public double ArrivalSeconds { get; init; }
    public double SentSeconds { get; init; }
    public double FinishedSeconds { get; set; }
    public int PromptTokens { get; init; }
    public int MaxTokens { get; init; }

    /// <summary><c>ok</c>, <c>rejected</c> (queue full or rate limit: RESOURCE_EXHAUSTED), <c>error</c> or <c>timeout</c>.</summary>
    public string Outcome { get; set; } = "error";

    public string? Error { get; set; }
    public string? Replica { get; set; }
    public int OutputTokens { get; set; }
    public double? TtftMs { get; set; }
    public double? E2eMs { get; set; }

    /// <summary>Time per output token after the first: (end-to-end − TTFT) / (tokens − 1).</summary>
    public double? TpotMs { get; set; }

    /// <summary>End-to-end latency per output token (the paper's "per-token latency"): end-to-end / tokens.</summary>
    public double? LatencyPerTokenMs { get; set; }

    public IReadOnlyList<int> PrefillDslaLayers { get; set; } = [];
    public IReadOnlyList<int> DecodeDslaLayers { get; set; } = [];
    public int LayerCount { get; set; }

    /// <summary>The DSLA variant the service converts to (from the receipt).</summary>
    public string? Variant { get; set; }

    /// <summary>Layers converted while the request ran (folded from its KV cache).</summary>
    public int Switches { get; set; }
}

/// <summary>One reading of one service's layer mix and load, from the controller.</summary>
public sealed record MixSample(double Seconds, string ServiceId, int DslaLayers, int LayerCount, int QueueDepth, int Running, int Round = 0);

/// <summary>Progress of one replay.</summary>
public sealed record ReplayProgress(string Mode, int Sent, int Finished, int Total, int Rejected, int Failed, TimeSpan Elapsed);

/// <summary>Everything one replay measured.</summary>
public sealed record ReplayRun(IReadOnlyList<RequestRecord> Requests, IReadOnlyList<MixSample> Mix, double DurationSeconds);

/// <summary>
/// Replays a trace against the gateway's gRPC endpoint in real time: each request is sent at its arrival time whatever
/// the state of the earlier ones (an open loop, as real traffic is), and streamed to the end. Meanwhile the controller is
/// asked for every service's layer mix at a fixed period.
/// </summary>
public sealed class ReplayRunner
{
    private readonly Generation.GenerationClient _gateway;
    private readonly ControllerAdmin.ControllerAdminClient _controller;
    private readonly Metadata _headers;
    private readonly TimeProvider _time;
    private readonly TimeSpan _samplePeriod;
    private readonly TimeSpan _requestTimeout;

    public ReplayRunner(Generation.GenerationClient gateway, string? apiKey, ControllerAdmin.ControllerAdminClient controller, TimeProvider time, TimeSpan samplePeriod, TimeSpan requestTimeout)
    {
        _gateway = gateway;
        _controller = controller;
        _headers = apiKey is null ? [] : new Metadata { { "authorization", $"Bearer {apiKey}" } };
        _time = time;
        _samplePeriod = samplePeriod;
        _requestTimeout = requestTimeout;
    }

    /// <summary>Replays <paramref name="trace"/>; <paramref name="prompts"/> gives request i its prompt token ids.</summary>
    public async Task<ReplayRun> RunAsync(string mode, IReadOnlyList<TraceRequest> trace, Func<int, int[]> prompts, IProgress<ReplayProgress> progress, CancellationToken cancellationToken, int round = 0)
    {
        ArgumentNullException.ThrowIfNull(trace);
        ArgumentNullException.ThrowIfNull(prompts);
        ArgumentNullException.ThrowIfNull(progress);
        var start = _time.GetTimestamp();
        double Now() => _time.GetElapsedTime(start).TotalSeconds;
        var samples = new ConcurrentQueue<MixSample>();
        using var stopSampling = CancellationTokenSource.CreateLinkedTokenSource(cancellationToken);
        var sampler = SampleAsync(samples, Now, round, stopSampling.Token);

        var records = new RequestRecord[trace.Count];
        var calls = new List<Task>(trace.Count);
        var counters = new int[3];   // finished, rejected, failed
        void Report() => progress.Report(new ReplayProgress(mode, calls.Count, Volatile.Read(ref counters[0]), trace.Count, Volatile.Read(ref counters[1]), Volatile.Read(ref counters[2]), _time.GetElapsedTime(start)));
        for (var i = 0; i < trace.Count; i++)
        {
            var wait = trace[i].ArrivalSeconds - Now();
            if (wait > 0)
            {
                await Task.Delay(TimeSpan.FromSeconds(wait), _time, cancellationToken).ConfigureAwait(false);
            }
            var record = records[i] = new RequestRecord { Index = i, Round = round, ArrivalSeconds = trace[i].ArrivalSeconds, SentSeconds = Now(), PromptTokens = trace[i].ContextTokens, MaxTokens = trace[i].GeneratedTokens };
            calls.Add(SendAsync(record, prompts(i), Now, cancellationToken).ContinueWith(_ =>
            {
                Interlocked.Increment(ref counters[0]);
                if (record.Outcome == "rejected")
                {
                    Interlocked.Increment(ref counters[1]);
                }
                else if (record.Outcome != "ok")
                {
                    Interlocked.Increment(ref counters[2]);
                }
                Report();
            }, CancellationToken.None, TaskContinuationOptions.ExecuteSynchronously, TaskScheduler.Default));
            Report();
        }
        await Task.WhenAll(calls).ConfigureAwait(false);
        var duration = Now();
        await stopSampling.CancelAsync().ConfigureAwait(false);
        await sampler.ConfigureAwait(false);
        return new ReplayRun(records, [.. samples.OrderBy(s => s.Seconds)], duration);
    }

    /// <summary>
    /// One short request before anything else, so a wrong key or an unreachable gateway is one clear error instead of a
    /// trace's worth of failed requests (and before the fleet's policy is touched).
    /// </summary>
    /// <exception cref="ArgumentException">The gateway refused the API key.</exception>
    /// <exception cref="InvalidOperationException">The gateway could not be reached or could not serve the request.</exception>
    public async Task PreflightAsync(int[] prompt, CancellationToken cancellationToken)
    {
        try
        {
            using var call = Start(prompt, 1, cancellationToken);
            await foreach (var _ in call.ResponseStream.ReadAllAsync(cancellationToken).ConfigureAwait(false))
            {
            }
        }
        catch (RpcException e) when (e.StatusCode is StatusCode.Unauthenticated or StatusCode.PermissionDenied)
        {
            throw new ArgumentException($"--api-key: the gateway refused it ({e.StatusCode}: {e.Status.Detail}).", e);
        }
        catch (RpcException e) when (e.StatusCode != StatusCode.Cancelled)
        {
            throw new InvalidOperationException($"the gateway did not serve a test request ({e.StatusCode}: {e.Status.Detail}); is the mesh up (deploy/local/run.sh)?", e);
        }
    }

    /// <summary>
    /// Starts a streaming generation through the gateway: greedy and exactly <paramref name="maxTokens"/> tokens, so a
    /// measurement does not depend on where EOS falls; the API key and the request deadline on the call.
    /// </summary>
    private AsyncServerStreamingCall<GenerateResponse> Start(int[] prompt, int maxTokens, CancellationToken cancellationToken)
    {
        var request = new GenerateRequest { TokenIds = new TokenIds(), Sampling = new SamplingParams { Temperature = 0, MaxTokens = maxTokens, IgnoreEos = true } };
        request.TokenIds.Ids.Add(prompt);
        return _gateway.Generate(request, new CallOptions(_headers, deadline: _time.GetUtcNow().UtcDateTime + _requestTimeout, cancellationToken: cancellationToken));
    }

    private async Task SendAsync(RequestRecord record, int[] prompt, Func<double> now, CancellationToken cancellationToken)
    {
        var sent = Stopwatch.GetTimestamp();
        double? firstToken = null;
        try
        {
            using var call = Start(prompt, record.MaxTokens, cancellationToken);
            var headers = await call.ResponseHeadersAsync.ConfigureAwait(false);
            record.Replica = headers.GetValue("x-dslamesh-replica");
            await foreach (var message in call.ResponseStream.ReadAllAsync(cancellationToken).ConfigureAwait(false))
            {
                if (message.TokenIds.Count > 0)
                {
                    firstToken ??= Stopwatch.GetElapsedTime(sent).TotalMilliseconds;
                    record.OutputTokens += message.TokenIds.Count;
                }
                if (message.Completion is { } completion)
                {
                    var e2e = Stopwatch.GetElapsedTime(sent).TotalMilliseconds;
                    record.Outcome = completion.FinishReason is "length" or "stop" ? "ok" : "error";
                    record.Error = record.Outcome == "ok" ? null : $"finished with '{completion.FinishReason}'";
                    record.TtftMs = firstToken;
                    record.E2eMs = e2e;
                    if (record.OutputTokens > 0)
                    {
                        record.LatencyPerTokenMs = e2e / record.OutputTokens;
                    }
                    if (record.OutputTokens > 1 && firstToken is { } ttft)
                    {
                        record.TpotMs = (e2e - ttft) / (record.OutputTokens - 1);
                    }
                    if (completion.Receipt is { } receipt)
                    {
                        record.PrefillDslaLayers = [.. receipt.PrefillDslaLayers];
                        record.DecodeDslaLayers = [.. receipt.DecodeDslaLayers];
                        record.LayerCount = receipt.LayerCount;
                        record.Variant = string.IsNullOrEmpty(receipt.Variant) ? null : receipt.Variant;
                        record.Switches = receipt.Switches.Count;
                    }
                }
            }
            if (record.E2eMs is null)
            {
                record.Outcome = "error";
                record.Error = "the stream ended without a completion";
            }
        }
        catch (RpcException e) when (e.StatusCode == StatusCode.ResourceExhausted)
        {
            record.Outcome = "rejected";
            record.Error = e.Status.Detail;
        }
        catch (RpcException e) when (e.StatusCode == StatusCode.DeadlineExceeded)
        {
            record.Outcome = "timeout";
            record.Error = $"no completion within {_requestTimeout.TotalSeconds:F0} s";
        }
        catch (RpcException e) when (!cancellationToken.IsCancellationRequested)
        {
            record.Outcome = "error";
            record.Error = $"{e.StatusCode}: {e.Status.Detail}";
        }
        record.FinishedSeconds = now();
    }

    private async Task SampleAsync(ConcurrentQueue<MixSample> samples, Func<double> now, int round, CancellationToken cancellationToken)
    {
        using var timer = new PeriodicTimer(_samplePeriod, _time);
        try
        {
            do
            {
                try
                {
                    var status = await _controller.GetStatusAsync(new GetStatusRequest(), cancellationToken: cancellationToken).ConfigureAwait(false);
                    var at = now();
                    foreach (var s in status.Services)
                    {
                        samples.Enqueue(new MixSample(at, s.Id, s.DslaLayers.Count, s.LayerCount, s.QueueDepth, s.Running, round));
                    }
                }
                catch (RpcException e) when (e.StatusCode != StatusCode.Cancelled)
                {
                    // A missed reading leaves a gap in the timeline; the replay itself goes on.
                }
            }
            while (await timer.WaitForNextTickAsync(cancellationToken).ConfigureAwait(false));
        }
        catch (OperationCanceledException) when (cancellationToken.IsCancellationRequested)
        {
        }
        catch (RpcException e) when (e.StatusCode == StatusCode.Cancelled)
        {
        }
    }
}

using System.Globalization;
using DslaMesh.Protos.V1;

namespace DslaMesh.Cli.Replay;

/// <summary>How a replay benchmark treats the fleet: warm-up length, how long to wait for a mode's mix, the SLO.</summary>
/// <param name="WarmupRequests">Unmeasured requests replayed before the first mode.</param>
/// <param name="Settle">How long to wait for every service to reach a mode's starting mix.</param>
/// <param name="Slo">The latency objective goodput counts against.</param>
/// <param name="Repeats">How many times the whole sequence of modes runs (interleaved, so slow drift of the machine
/// touches every mode alike); each mode's figures pool its repetitions.</param>
public sealed record ReplayBenchmarkSettings(int WarmupRequests, TimeSpan Settle, ServiceLevelObjective Slo, int Repeats = 1);

/// <summary>Shows a replay's progress while <paramref name="body"/> runs it (a progress bar, or log lines).</summary>
public delegate Task<ReplayRun> ReplayProgressDisplay(string mode, int total, Func<IProgress<ReplayProgress>, Task<ReplayRun>> body, Action<string> log);

/// <summary>
/// Runs the modes of a replay against a fleet through its controller: an unmeasured warm-up, then for each mode its
/// policy, a wait until every service runs the mode's starting mix and is idle, the replay and its summary. The policy
/// in force before is restored afterwards (as a new version), also after cancellation or a failure.
/// </summary>
public sealed class ReplayBenchmark
{
    private const string SetBy = "dslactl bench replay";

    private readonly ControllerAdmin.ControllerAdminClient _admin;
    private readonly ReplayRunner _runner;
    private readonly ReplayBenchmarkSettings _settings;
    private readonly Action<string> _log;
    private readonly ReplayProgressDisplay _display;
    private readonly TimeProvider _time;

    public ReplayBenchmark(ControllerAdmin.ControllerAdminClient admin, ReplayRunner runner, ReplayBenchmarkSettings settings, Action<string> log, ReplayProgressDisplay display, TimeProvider time)
    {
        _time = time;
        _admin = admin;
        _runner = runner;
        _settings = settings;
        _log = log;
        _display = display;
    }

    /// <summary>Every mode in order, on the same trace and prompts.</summary>
    /// <exception cref="TimeoutException">A service did not reach a mode's starting mix within the settle time.</exception>
    public async Task<IReadOnlyList<ModeResult>> RunAsync(IReadOnlyList<ReplayMode> modes, IReadOnlyList<TraceRequest> trace, Func<int, int[]> prompts, CancellationToken cancellationToken)
    {
        ArgumentNullException.ThrowIfNull(modes);
        ArgumentNullException.ThrowIfNull(trace);
        var previous = await _admin.GetPolicyAsync(new GetPolicyRequest(), cancellationToken: cancellationToken).ConfigureAwait(false);
        var results = new List<ModeResult>();
        try
        {
            await WarmUpAsync(trace, prompts, cancellationToken).ConfigureAwait(false);
            var runs = modes.ToDictionary(m => m.Name, _ => new List<ReplayRun>(), StringComparer.Ordinal);
            for (var round = 0; round < Math.Max(1, _settings.Repeats); round++)
            {
                foreach (var mode in modes)
                {
                    await ApplyAsync(mode, cancellationToken).ConfigureAwait(false);
                    var label = _settings.Repeats > 1 ? $"{mode.Name} ({round + 1}/{_settings.Repeats})" : mode.Name;
                    var current = round;
                    var run = await _display(label, trace.Count, progress => _runner.RunAsync(label, trace, prompts, progress, cancellationToken, current), _log).ConfigureAwait(false);
                    runs[mode.Name].Add(run);
                    var summary = ModeSummary.Of(mode, run, _settings.Slo);
                    _log(string.Create(CultureInfo.InvariantCulture, $"{label}: {summary.Completed} done, {summary.Rejected} rejected, {summary.Failed} failed; per-token latency mean {summary.LatencyPerToken?.Mean:F1} ms; {summary.Conversions} conversions, {summary.Reverts} reverts"));
                }
            }
            foreach (var mode in modes)
            {
                var pooled = new ReplayRun([.. runs[mode.Name].SelectMany(r => r.Requests)], [.. runs[mode.Name].SelectMany(r => r.Mix)], runs[mode.Name].Sum(r => r.DurationSeconds));
                results.Add(new ModeResult(ModeSummary.Of(mode, pooled, _settings.Slo), pooled.Requests, pooled.Mix));
            }
        }
        finally
        {
            using var restore = new CancellationTokenSource(TimeSpan.FromSeconds(10));
            await _admin.SetPolicyAsync(new SetPolicyRequest { PolicyJson = previous.PolicyJson, Comment = $"bench replay: restore version {previous.Version}", SetBy = SetBy }, cancellationToken: restore.Token).ConfigureAwait(false);
        }
        return results;
    }

    /// <summary>
    /// Replays the trace's first requests at their arrival times with half the layers on DSLA, unmeasured: the
    /// services' caches and allocators warm up on both layer kinds before any mode is measured.
    /// </summary>
    private async Task WarmUpAsync(IReadOnlyList<TraceRequest> trace, Func<int, int[]> prompts, CancellationToken cancellationToken)
    {
        if (_settings.WarmupRequests <= 0)
        {
            return;
        }
        await ApplyAsync(ReplayModes.Parse("dsla50", ReplayModes.ScaledDefault(1)), cancellationToken, "warm-up").ConfigureAwait(false);
        var warm = await _display("warm-up", Math.Min(_settings.WarmupRequests, trace.Count), progress => _runner.RunAsync("warm-up", [.. trace.Take(_settings.WarmupRequests)], prompts, progress, cancellationToken), _log).ConfigureAwait(false);
        _log(string.Create(CultureInfo.InvariantCulture, $"warm-up: {warm.Requests.Count(r => r.Outcome == "ok")} of {warm.Requests.Count} requests served in {warm.DurationSeconds:F0} s (not measured)"));
    }

    /// <summary>Sets the mode's policy and waits until every service runs its starting mix (static: its layers; adaptive: none) and is idle.</summary>
    private async Task ApplyAsync(ReplayMode mode, CancellationToken cancellationToken, string? purpose = null)
    {
        await _admin.SetPolicyAsync(new SetPolicyRequest { PolicyJson = mode.PolicyJson, Comment = $"bench replay: {purpose ?? mode.Name}", SetBy = SetBy }, cancellationToken: cancellationToken).ConfigureAwait(false);
        var deadline = _time.GetUtcNow() + _settings.Settle;
        while (true)
        {
            var status = await _admin.GetStatusAsync(new GetStatusRequest(), cancellationToken: cancellationToken).ConfigureAwait(false);
            var pending = status.Services.Where(s =>
                s.DslaLayers.Count != ReplayModes.StaticLayers(mode.StaticFraction ?? 0, s.LayerCount)
                || !s.DesiredDslaLayers.Order().SequenceEqual(s.DslaLayers.Order())
                || s.QueueDepth > 0 || s.Running > 0).ToList();
            if (pending.Count == 0)
            {
                _log($"{purpose ?? mode.Name}: every service is at its starting mix ({mode.Description})");
                return;
            }
            if (_time.GetUtcNow() > deadline)
            {
                throw new TimeoutException($"{mode.Name}: after {_settings.Settle.TotalSeconds:F0} s {string.Join(", ", pending.Select(s => $"{s.Id} runs {s.DslaLayers.Count} DSLA layers (wants {ReplayModes.StaticLayers(mode.StaticFraction ?? 0, s.LayerCount)}), queue {s.QueueDepth}, running {s.Running}"))}");
            }
            await Task.Delay(TimeSpan.FromMilliseconds(200), _time, cancellationToken).ConfigureAwait(false);
        }
    }
}

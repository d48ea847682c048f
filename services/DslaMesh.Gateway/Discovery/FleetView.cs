using System.Collections.Concurrent;
using System.Collections.Frozen;
using DslaMesh.Fleet;

namespace DslaMesh.Gateway.Discovery;

/// <summary>
/// What the gateway knows about the fleet: the registered replicas (an immutable snapshot, replaced whole) and each
/// replica's latest metrics (replaced per message). Readers on the request path never lock.
/// </summary>
public sealed class FleetView
{
    private readonly ConcurrentDictionary<string, ReplicaLoad> _loads = new(StringComparer.Ordinal);
    private readonly TimeProvider _time;
    private volatile FrozenDictionary<string, ServiceRegistration> _replicas = FrozenDictionary<string, ServiceRegistration>.Empty;

    public FleetView(TimeProvider time) => _time = time;

    /// <summary>The registered replicas by service id.</summary>
    public FrozenDictionary<string, ServiceRegistration> Replicas => _replicas;

    /// <summary>When the registry was last read successfully (a <see cref="TimeProvider"/> timestamp), or 0.</summary>
    public long LastRefreshTimestamp { get; private set; }

    /// <summary>Whether the last registry read failed (the gateway keeps routing to what it knew).</summary>
    public bool RegistryUnavailable { get; internal set; }

    /// <summary>The live load of a replica (created on first use).</summary>
    public ReplicaLoad Load(string id) => _loads.GetOrAdd(id, static _ => new ReplicaLoad());

    /// <summary>
    /// Replaces the registered set. Returns true when what routing depends on changed (ids or addresses), so the proxy
    /// configuration must be rebuilt.
    /// </summary>
    public bool SetReplicas(IReadOnlyDictionary<string, ServiceRegistration> replicas)
    {
        ArgumentNullException.ThrowIfNull(replicas);
        LastRefreshTimestamp = _time.GetTimestamp();
        RegistryUnavailable = false;
        var old = _replicas;
        var changed = old.Count != replicas.Count || replicas.Any(r => !old.TryGetValue(r.Key, out var before)
            || before.Address != r.Value.Address || before.GrpcAddress != r.Value.GrpcAddress || before.Model != r.Value.Model);
        _replicas = replicas.ToFrozenDictionary(StringComparer.Ordinal);
        foreach (var gone in _loads.Keys.Where(id => !replicas.ContainsKey(id)))
        {
            _loads.TryRemove(gone, out _);
        }
        return changed;
    }

    /// <summary>Records a metrics message; returns true when it comes from a replica not (yet) registered here.</summary>
    public bool UpdateMetrics(ServiceMetricsRecord metrics)
    {
        ArgumentNullException.ThrowIfNull(metrics);
        Load(metrics.Id).Update(metrics, _time.GetTimestamp());
        return !_replicas.ContainsKey(metrics.Id);
    }

    /// <summary>How old a sample is, by the gateway's clock (immune to clock skew between machines).</summary>
    public TimeSpan Age(MetricsSample sample) => _time.GetElapsedTime(sample.ReceivedTimestamp);
}

/// <summary>A metrics record and when the gateway first saw it.</summary>
public sealed record MetricsSample(ServiceMetricsRecord Record, long ReceivedTimestamp);

/// <summary>One replica's latest metrics plus the requests this gateway sent it since those metrics were taken.</summary>
public sealed class ReplicaLoad
{
    private volatile MetricsSample? _sample;
    private int _sentSinceMetrics;

    /// <summary>The latest metrics, or null before any arrived.</summary>
    public MetricsSample? Sample => _sample;

    /// <summary>
    /// Requests routed here since the latest metrics: the metrics cannot show them yet, and counting them keeps a burst
    /// that arrives between two metrics messages from piling onto one replica.
    /// </summary>
    public int SentSinceMetrics => Volatile.Read(ref _sentSinceMetrics);

    /// <summary>Counts one request routed here.</summary>
    public void RecordSent() => Interlocked.Increment(ref _sentSinceMetrics);

    internal void Update(ServiceMetricsRecord metrics, long now)
    {
        // Polling re-reads the same record; only a newer one resets the count and the age.
        if (_sample is { } current && current.Record.Timestamp >= metrics.Timestamp)
        {
            return;
        }
        _sample = new MetricsSample(metrics, now);
        Volatile.Write(ref _sentSinceMetrics, 0);
    }
}

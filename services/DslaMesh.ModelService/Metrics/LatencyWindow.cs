namespace DslaMesh.ModelService.Metrics;

/// <summary>The last N latency samples, for percentiles published to Redis. Thread-safe.</summary>
public sealed class LatencyWindow
{
    private readonly double[] _samples;
    private readonly Lock _gate = new();
    private int _count;
    private int _next;

    public LatencyWindow(int capacity) => _samples = new double[capacity];

    /// <summary>Adds a sample, evicting the oldest when full.</summary>
    public void Add(double value)
    {
        lock (_gate)
        {
            _samples[_next] = value;
            _next = (_next + 1) % _samples.Length;
            _count = Math.Min(_count + 1, _samples.Length);
        }
    }

    /// <summary>The q-quantile (0..1) of the window by nearest rank; 0 when empty.</summary>
    public double Quantile(double q)
    {
        double[] copy;
        lock (_gate)
        {
            copy = _samples[.._count];
        }
        if (copy.Length == 0)
        {
            return 0;
        }
        Array.Sort(copy);
        var rank = (int)Math.Ceiling(q * copy.Length) - 1;
        return copy[Math.Clamp(rank, 0, copy.Length - 1)];
    }
}

using DslaMesh.Gateway.Discovery;
using DslaMesh.Gateway.Hosting;
using Microsoft.Extensions.Options;
using Yarp.ReverseProxy.LoadBalancing;
using Yarp.ReverseProxy.Model;

namespace DslaMesh.Gateway.Routing;

/// <summary>
/// Picks the replica with the lowest cost for this request, from each replica's live metrics (pattern 13):
/// <code>
/// cost = LoadWeight · (queued + running + sent since its metrics) / max_batch_size
///      + KvWeight · kv_used / kv_total · (0.5 + long)
///      + FidelityWeight · max(0, dsla_fraction − allowed_dsla_fraction)
///      + LongPromptDslaWeight · long · (1 − dsla_fraction)
/// </code>
/// where <c>long</c> = min(1, prompt tokens / LongPromptTokens) and <c>allowed_dsla_fraction</c> is 0 for
/// <c>exact</c>, <c>max_dsla_fraction</c> when given and 1 otherwise. So exact requests go to replicas with fewer DSLA
/// layers, long prompts to replicas with more DSLA layers and free KV memory, and everything away from queues.
/// Replicas serving another model than the one asked for, and draining replicas, are skipped while others remain.
/// When any candidate's metrics are missing or stale the signals are not comparable, and the policy falls back to
/// power-of-two-choices on in-flight requests.
/// </summary>
public sealed class MeshLoadBalancingPolicy : ILoadBalancingPolicy
{
    /// <summary>The name clusters refer to.</summary>
    public const string PolicyName = "DslaMeshMetrics";

    private readonly FleetView _fleet;
    private readonly RoutingOptions _options;
    private readonly Random _random;

    public MeshLoadBalancingPolicy(FleetView fleet, IOptions<GatewayOptions> options)
        : this(fleet, options, Random.Shared)
    {
    }

    /// <summary>With a chosen random source (tests seed it).</summary>
    public MeshLoadBalancingPolicy(FleetView fleet, IOptions<GatewayOptions> options, Random random)
    {
        ArgumentNullException.ThrowIfNull(options);
        _fleet = fleet;
        _options = options.Value.Routing;
        _random = random;
    }

    /// <inheritdoc/>
    public string Name => PolicyName;

    /// <inheritdoc/>
    public DestinationState? PickDestination(HttpContext context, ClusterState cluster, IReadOnlyList<DestinationState> availableDestinations)
    {
        ArgumentNullException.ThrowIfNull(context);
        ArgumentNullException.ThrowIfNull(availableDestinations);
        var count = availableDestinations.Count;
        if (count == 0)
        {
            return null;
        }
        var traits = context.Features.Get<RequestTraits>() ?? RequestTraits.Unknown;
        var replicas = _fleet.Replicas;
        Span<int> candidates = count <= 64 ? stackalloc int[count] : new int[count];
        var n = Filter(availableDestinations, traits, candidates);
        candidates = candidates[..n];

        DestinationState picked;
        if (n == 1)
        {
            picked = availableDestinations[candidates[0]];
        }
        else
        {
            var best = -1;
            var bestCost = double.MaxValue;
            var fresh = true;
            foreach (var i in candidates)
            {
                var id = availableDestinations[i].DestinationId;
                if (!replicas.TryGetValue(id, out var registration) || _fleet.Load(id) is not { Sample: { } sample } load || _fleet.Age(sample) > _options.MetricsStaleAfter)
                {
                    fresh = false;
                    break;
                }
                // A little jitter breaks ties without herding every gateway onto the same replica.
                var cost = Cost(sample.Record, registration.MaxBatchSize, load.SentSinceMetrics, traits) + (_random.NextDouble() * 1e-3);
                if (cost < bestCost)
                {
                    bestCost = cost;
                    best = i;
                }
            }
            picked = fresh ? availableDestinations[best] : PowerOfTwo(availableDestinations, candidates);
        }
        _fleet.Load(picked.DestinationId).RecordSent();
        return picked;
    }

    /// <summary>The cost of sending a request with these traits to a replica in this state (lower is better).</summary>
    public double Cost(DslaMesh.Fleet.ServiceMetricsRecord metrics, int maxBatchSize, int sentSinceMetrics, RequestTraits traits)
    {
        ArgumentNullException.ThrowIfNull(metrics);
        ArgumentNullException.ThrowIfNull(traits);
        var load = (metrics.QueueDepth + metrics.Running + sentSinceMetrics) / (double)Math.Max(1, maxBatchSize);
        var kv = metrics.KvTotalBytes > 0 ? Math.Clamp(metrics.KvUsedBytes / (double)metrics.KvTotalBytes, 0, 1) : 0;
        var dsla = metrics.LayerCount > 0 ? Math.Clamp(metrics.DslaLayers.Count / (double)metrics.LayerCount, 0, 1) : 0;
        var longness = Math.Min(1, traits.PromptTokens / (double)_options.LongPromptTokens);
        return (_options.LoadWeight * load)
            + (_options.KvWeight * kv * (0.5 + longness))
            + (_options.FidelityWeight * Math.Max(0, dsla - traits.AllowedDslaFraction))
            + (_options.LongPromptDslaWeight * longness * (1 - dsla));
    }

    /// <summary>Keeps replicas that serve the requested model and are not draining; all of them when none would remain.</summary>
    private int Filter(IReadOnlyList<DestinationState> destinations, RequestTraits traits, Span<int> into)
    {
        var replicas = _fleet.Replicas;
        var n = 0;
        for (var pass = 0; pass < 3 && n == 0; pass++)
        {
            for (var i = 0; i < destinations.Count; i++)
            {
                var id = destinations[i].DestinationId;
                var keep = pass switch
                {
                    0 => ServesModel(replicas, id, traits.Model) && !Draining(id),
                    1 => ServesModel(replicas, id, traits.Model),
                    _ => true,
                };
                if (keep)
                {
                    into[n++] = i;
                }
            }
        }
        return n;
    }

    private static bool ServesModel(System.Collections.Frozen.FrozenDictionary<string, DslaMesh.Fleet.ServiceRegistration> replicas, string id, string? model) =>
        model is null || (replicas.TryGetValue(id, out var registration) && string.Equals(registration.Model, model, StringComparison.Ordinal));

    private bool Draining(string id) => _fleet.Load(id).Sample is { } sample && sample.Record.Draining && _fleet.Age(sample) <= _options.MetricsStaleAfter;

    private DestinationState PowerOfTwo(IReadOnlyList<DestinationState> destinations, ReadOnlySpan<int> candidates)
    {
        var first = _random.Next(candidates.Length);
        var second = _random.Next(candidates.Length - 1);
        if (second >= first)
        {
            second++;
        }
        var a = destinations[candidates[first]];
        var b = destinations[candidates[second]];
        return a.ConcurrentRequestCount <= b.ConcurrentRequestCount ? a : b;
    }
}

using System.Net;
using DslaMesh.Fleet;
using DslaMesh.Gateway.Hosting;
using DslaMesh.Gateway.Routing;
using DslaMesh.Gateway.Security;
using Microsoft.Extensions.Options;
using Microsoft.Extensions.Primitives;
using Yarp.ReverseProxy.Configuration;
using Yarp.ReverseProxy.Forwarder;

namespace DslaMesh.Gateway.Discovery;

/// <summary>
/// Feeds YARP the routes and clusters built from the Redis registry: each change is a new immutable snapshot, and
/// cancelling the old snapshot's token tells YARP to reload (pattern 12 in style-anchors.md).
/// </summary>
public sealed class FleetProxyConfigProvider : IProxyConfigProvider
{
    /// <summary>The route and cluster of the OpenAI HTTP API (HTTP/1.1 to each replica's HTTP endpoint).</summary>
    public const string OpenAiCluster = "openai";

    /// <summary>The route and cluster of gRPC generation (h2c to each replica's gRPC endpoint).</summary>
    public const string GrpcCluster = "grpc";

    private readonly GatewayOptions _options;
    private volatile Snapshot _snapshot;

    public FleetProxyConfigProvider(IOptions<GatewayOptions> options)
    {
        _options = options.Value;
        _snapshot = new Snapshot(Routes(), Clusters([]));
    }

    /// <inheritdoc/>
    public IProxyConfig GetConfig() => _snapshot;

    /// <summary>Publishes a configuration for these replicas.</summary>
    public void Update(IEnumerable<ServiceRegistration> replicas)
    {
        var next = new Snapshot(Routes(), Clusters([.. replicas]));
        var old = Interlocked.Exchange(ref _snapshot, next);
        old.Signal();
    }

    private List<RouteConfig> Routes()
    {
        var policy = _options.RequireApiKey ? ApiKeyDefaults.PolicyName : null;
        return
        [
            new RouteConfig
            {
                RouteId = OpenAiCluster,
                ClusterId = OpenAiCluster,
                Match = new RouteMatch { Path = "/v1/{**rest}" },
                AuthorizationPolicy = policy,
                RateLimiterPolicy = ApiKeyDefaults.RateLimiterPolicyName,
            },
            new RouteConfig
            {
                RouteId = GrpcCluster,
                ClusterId = GrpcCluster,
                // Only generation is public: LayerControl and health stay between the controller and the replicas.
                Match = new RouteMatch { Path = "/dslamesh.v1.Generation/{method}" },
                AuthorizationPolicy = policy,
                RateLimiterPolicy = ApiKeyDefaults.RateLimiterPolicyName,
            },
        ];
    }

    private List<ClusterConfig> Clusters(IReadOnlyList<ServiceRegistration> replicas)
    {
        var health = new HealthCheckConfig
        {
            Active = new ActiveHealthCheckConfig
            {
                Enabled = true,
                Interval = _options.Health.ActiveInterval,
                Timeout = _options.Health.ActiveTimeout,
                Policy = "ConsecutiveFailures",
                Path = "/health",
            },
            Passive = new PassiveHealthCheckConfig
            {
                Enabled = true,
                Policy = MeshPassiveHealthPolicy.PolicyName,
                ReactivationPeriod = _options.Health.ReactivationPeriod,
            },
        };
        var metadata = new Dictionary<string, string>
        {
            ["ConsecutiveFailuresHealthPolicy.Threshold"] = _options.Health.ActiveFailureThreshold.ToString(System.Globalization.CultureInfo.InvariantCulture),
        };
        // The two clusters differ only in the replica address they use and the HTTP version they speak to it.
        ClusterConfig Cluster(string id, Version version, HttpVersionPolicy policy, Func<ServiceRegistration, string> address) => new()
        {
            ClusterId = id,
            LoadBalancingPolicy = MeshLoadBalancingPolicy.PolicyName,
            HealthCheck = health,
            Metadata = metadata,
            HttpRequest = new ForwarderRequestConfig
            {
                Version = version,
                VersionPolicy = policy,
                ActivityTimeout = _options.StreamActivityTimeout,
                AllowResponseBuffering = false,
            },
            Destinations = replicas.ToDictionary(r => r.Id, r => new DestinationConfig { Address = address(r), Metadata = Describe(r) }, StringComparer.Ordinal),
        };
        return
        [
            // The replicas' HTTP endpoint is cleartext HTTP/1.1+2, where Kestrel speaks HTTP/1.1 only.
            Cluster(OpenAiCluster, HttpVersion.Version11, HttpVersionPolicy.RequestVersionOrLower, r => r.Address),
            // h2c: prior-knowledge HTTP/2 to the replicas' HTTP/2-only gRPC endpoint (pattern 14).
            Cluster(GrpcCluster, HttpVersion.Version20, HttpVersionPolicy.RequestVersionExact, r => r.GrpcAddress),
        ];
    }

    private static Dictionary<string, string> Describe(ServiceRegistration r) => new()
    {
        ["model"] = r.Model,
        ["layer_count"] = r.LayerCount.ToString(System.Globalization.CultureInfo.InvariantCulture),
    };

    [System.Diagnostics.CodeAnalysis.SuppressMessage("Reliability", "CA1001", Justification = "The source is cancelled once when replaced; YARP may still hold its token, so it is left to the GC.")]
    private sealed class Snapshot : IProxyConfig
    {
        private readonly CancellationTokenSource _changed = new();

        public Snapshot(IReadOnlyList<RouteConfig> routes, IReadOnlyList<ClusterConfig> clusters)
        {
            Routes = routes;
            Clusters = clusters;
            ChangeToken = new CancellationChangeToken(_changed.Token);
        }

        public IReadOnlyList<RouteConfig> Routes { get; }
        public IReadOnlyList<ClusterConfig> Clusters { get; }
        public IChangeToken ChangeToken { get; }

        public void Signal() => _changed.Cancel();
    }
}

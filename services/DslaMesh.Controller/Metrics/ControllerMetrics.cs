using DslaMesh.Policy;
using Prometheus;

namespace DslaMesh.Controller.Metrics;

/// <summary>
/// The controller's Prometheus metrics on <c>/metrics</c>: leadership, Redis reachability, the policy version, and per
/// service the layers it runs, wants, may run (cap) and whether its control stream is up, read at scrape time; decisions
/// and command answers are counted as they happen.
/// </summary>
public sealed class ControllerMetrics
{
    private const string ServiceLabel = "service";

    private readonly Counter _decisions;
    private readonly Counter _answers;
    private readonly Gauge _leader;
    private readonly Gauge _redisUp;
    private readonly Gauge _policyVersion;
    private readonly Gauge _services;
    private readonly Gauge _dslaLayers;
    private readonly Gauge _desiredLayers;
    private readonly Gauge _capLayers;
    private readonly Gauge _streamUp;
    private readonly Gauge _epoch;
    private readonly Gauge[] _perService;
    private readonly HashSet<string> _labelled = new(StringComparer.Ordinal);
    private readonly Lock _gate = new();

    public ControllerMetrics()
    {
        Registry = Prometheus.Metrics.NewCustomRegistry();
        var factory = Prometheus.Metrics.WithCustomRegistry(Registry);
        _decisions = factory.CreateCounter("dsla_controller_decisions_total", "Policy decisions that changed a service's layers, by action.", new CounterConfiguration { LabelNames = ["action"] });
        _answers = factory.CreateCounter("dsla_controller_commands_total", "Conversion commands answered by services, by result (accepted, rejected).", new CounterConfiguration { LabelNames = ["result"] });
        _leader = factory.CreateGauge("dsla_controller_leader", "1 while this controller holds the leader lease.");
        _redisUp = factory.CreateGauge("dsla_controller_redis_up", "1 while the last tick reached Redis.");
        _policyVersion = factory.CreateGauge("dsla_controller_policy_version", "Version of the policy in force.");
        _services = factory.CreateGauge("dsla_controller_services", "Model services the controller tracks.");
        _dslaLayers = factory.CreateGauge("dsla_controller_service_dsla_layers", "DSLA layers a service reports running.", ServiceLabel);
        _desiredLayers = factory.CreateGauge("dsla_controller_service_desired_dsla_layers", "DSLA layers the controller wants a service to run.", ServiceLabel);
        _capLayers = factory.CreateGauge("dsla_controller_service_cap_layers", "Most DSLA layers the policy allows a service now.", ServiceLabel);
        _streamUp = factory.CreateGauge("dsla_controller_service_stream_up", "1 while the control stream to a service is connected.", ServiceLabel);
        _epoch = factory.CreateGauge("dsla_controller_service_epoch", "Conversion epoch a service has applied.", ServiceLabel);
        _perService = [_dslaLayers, _desiredLayers, _capLayers, _streamUp, _epoch];
    }

    /// <summary>This controller's registry (one per host, so several hosts can share a test process).</summary>
    public CollectorRegistry Registry { get; }

    /// <summary>A decision that converts or reverts layers (the caller skips holds).</summary>
    public void OnDecision(DecisionAction action) => _decisions.WithLabels(action.ToString().ToLowerInvariant()).Inc();

    /// <summary>A service's answer to a command.</summary>
    public void OnAnswer(bool accepted) => _answers.WithLabels(accepted ? "accepted" : "rejected").Inc();

    /// <summary>Sets the gauges from the controller's state (called before each scrape).</summary>
    public void Refresh(bool leader, bool redisUp, long policyVersion, IReadOnlyList<Control.ServiceStatusView> services)
    {
        ArgumentNullException.ThrowIfNull(services);
        lock (_gate)
        {
            _leader.Set(leader ? 1 : 0);
            _redisUp.Set(redisUp ? 1 : 0);
            _policyVersion.Set(policyVersion);
            _services.Set(services.Count);
            foreach (var gone in _labelled.Except(services.Select(s => s.Id)).ToList())
            {
                foreach (var gauge in _perService)
                {
                    gauge.RemoveLabelled(gone);
                }
                _labelled.Remove(gone);
            }
            foreach (var s in services)
            {
                _labelled.Add(s.Id);
                _dslaLayers.WithLabels(s.Id).Set(s.DslaLayers.Count);
                _desiredLayers.WithLabels(s.Id).Set(s.Desired.Count);
                _capLayers.WithLabels(s.Id).Set(s.CapLayers);
                _streamUp.WithLabels(s.Id).Set(s.Connected ? 1 : 0);
                _epoch.WithLabels(s.Id).Set(s.Epoch);
            }
        }
    }
}

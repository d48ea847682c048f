using DslaMesh.Fleet;
using DslaMesh.Policy;
using DslaMesh.Protos.V1;

namespace DslaMesh.Controller.Control;

/// <summary>What the controller knows about one model service. Guarded by the <see cref="FleetController"/>'s lock.</summary>
internal sealed class TrackedService(string id)
{
    public string Id { get; } = id;
    public ServiceRegistration? Registration { get; set; }
    public ServiceMetricsRecord? Metrics { get; set; }
    public DateTimeOffset LastRegistered { get; set; }
    public ServiceDecisionState State { get; set; } = ServiceDecisionState.Empty;
    public bool StateLoaded { get; set; }
    public IReadOnlyList<int> Desired { get; set; } = [];
    public long IssuedEpoch { get; set; }
    public IReadOnlyList<int>? IssuedLayers { get; set; }
    public ConversionState? Observed { get; set; }
    /// <summary>Set when the service must be sent the desired state again (new here, stale rejection, foreign command).</summary>
    public bool NeedsResync { get; set; } = true;
    public string LastDecision { get; set; } = "";
    public int CapLayers { get; set; }
    public ServiceConnection? Connection { get; set; }

    public int LayerCount => Registration?.LayerCount ?? Observed?.LayerCount ?? Metrics?.LayerCount ?? 0;

    /// <summary>The highest epoch this service is known to have reached; a new epoch must be above it.</summary>
    public long EpochFloor => Math.Max(IssuedEpoch, Math.Max(Observed?.Epoch ?? 0, Metrics?.Epoch ?? 0));
}

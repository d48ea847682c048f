using System.Text.Json;
using System.Text.Json.Serialization;
using DslaMesh.Fleet;

namespace DslaMesh.Policy;

/// <summary>A decision the policy would have made at a point of a recorded trace.</summary>
public sealed record DryRunDecision(
    [property: JsonPropertyName("timestamp")] DateTimeOffset Timestamp,
    [property: JsonPropertyName("service")] string Service,
    [property: JsonPropertyName("action")] string Action,
    [property: JsonPropertyName("changed")] IReadOnlyList<int> Changed,
    [property: JsonPropertyName("dsla_layers")] IReadOnlyList<int> DslaLayers,
    [property: JsonPropertyName("layer_count")] int LayerCount,
    [property: JsonPropertyName("cap_layers")] int CapLayers,
    [property: JsonPropertyName("reason")] string Reason);

/// <summary>
/// Replays a recorded metrics trace (JSON lines of <see cref="ServiceMetricsRecord"/>, as services publish them) through
/// <see cref="DecisionEngine"/>, evaluating the fleet at each record's timestamp, and returns the conversions and
/// reversions the policy would have made.
/// </summary>
public static class DryRun
{
    /// <summary>Reads a trace; a line that is not a metrics record is an error naming the line.</summary>
    public static IReadOnlyList<ServiceMetricsRecord> ReadTrace(TextReader reader)
    {
        ArgumentNullException.ThrowIfNull(reader);
        var records = new List<ServiceMetricsRecord>();
        var number = 0;
        while (reader.ReadLine() is { } line)
        {
            number++;
            if (string.IsNullOrWhiteSpace(line))
            {
                continue;
            }
            try
            {
                var record = JsonSerializer.Deserialize(line, FleetJsonContext.Default.ServiceMetricsRecord);
                if (record is null || string.IsNullOrEmpty(record.Id) || record.LayerCount <= 0)
                {
                    throw new FormatException($"trace line {number}: a metrics record needs an id and a layer_count above 0");
                }
                records.Add(record);
            }
            catch (JsonException e)
            {
                throw new FormatException($"trace line {number}: {e.Message}", e);
            }
        }
        return records;
    }

    /// <summary>Replays a trace.</summary>
    /// <param name="policy">The policy to try.</param>
    /// <param name="trace">Metrics records (any order; replayed by timestamp).</param>
    /// <param name="sensitivityOrder">The conversion order of a service with a given layer count (default: last layer first).</param>
    /// <param name="includeHolds">Also report evaluations that changed nothing.</param>
    public static IReadOnlyList<DryRunDecision> Replay(ConversionPolicy policy, IEnumerable<ServiceMetricsRecord> trace, Func<string, int, IReadOnlyList<int>>? sensitivityOrder = null, bool includeHolds = false)
    {
        ArgumentNullException.ThrowIfNull(policy);
        ArgumentNullException.ThrowIfNull(trace);
        sensitivityOrder ??= (_, layers) => Enumerable.Range(0, layers).Reverse().ToList();
        var latest = new Dictionary<string, ServiceView>(StringComparer.Ordinal);
        var states = new Dictionary<string, ServiceDecisionState>(StringComparer.Ordinal);
        var output = new List<DryRunDecision>();
        foreach (var record in trace.OrderBy(r => r.Timestamp))
        {
            latest[record.Id] = new ServiceView(record.Id, record.LayerCount, latest.TryGetValue(record.Id, out var known) && known.LayerCount == record.LayerCount
                ? known.SensitivityOrder
                : sensitivityOrder(record.Id, record.LayerCount), record);
            var views = latest.Values.OrderBy(v => v.Id, StringComparer.Ordinal).ToList();
            foreach (var decision in DecisionEngine.Decide(policy, views, states, record.Timestamp))
            {
                states[decision.ServiceId] = decision.State;
                if (includeHolds ? decision.ServiceId == record.Id : decision.Action != DecisionAction.Hold)
                {
                    output.Add(new DryRunDecision(record.Timestamp, decision.ServiceId, decision.Action.ToString().ToLowerInvariant(), decision.Changed, decision.DslaLayers,
                        latest[decision.ServiceId].LayerCount, decision.CapLayers, decision.Reason));
                }
            }
        }
        return output;
    }
}

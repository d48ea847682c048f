using System.Globalization;
using System.Text.Json.Serialization;
using DslaMesh.Fleet;

namespace DslaMesh.Policy;

/// <summary>What the decision rule needs to know about one model service.</summary>
/// <param name="Id">Service id.</param>
/// <param name="LayerCount">Decoder layers of the served model.</param>
/// <param name="SensitivityOrder">The order to convert layers in (least sensitive first).</param>
/// <param name="Metrics">The service's latest published metrics, or null when none were read.</param>
public sealed record ServiceView(string Id, int LayerCount, IReadOnlyList<int> SensitivityOrder, ServiceMetricsRecord? Metrics);

/// <summary>An operator's manual pin: a layer held at a kind until a time (null: until cleared).</summary>
public sealed record LayerPin(
    [property: JsonPropertyName("layer")] int Layer,
    [property: JsonPropertyName("dsla")] bool Dsla,
    [property: JsonPropertyName("until")] DateTimeOffset? Until);

/// <summary>
/// The decision rule's memory of one service: the layers the policy converted, in conversion order (the last one is
/// reverted first), when it last stepped, the longest recent prompt, and manual pins.
/// </summary>
public sealed record ServiceDecisionState
{
    /// <summary>An empty state: nothing converted.</summary>
    public static ServiceDecisionState Empty { get; } = new();

    /// <summary>Layers the policy converted, oldest first (LIFO).</summary>
    [JsonPropertyName("policy_layers")]
    public IReadOnlyList<int> PolicyLayers { get; set; } = [];

    /// <summary>When the policy last converted or reverted a layer of this service.</summary>
    [JsonPropertyName("last_step_at")]
    public DateTimeOffset? LastStepAt { get; set; }

    /// <summary>The longest prompt seen within the prompt window.</summary>
    [JsonPropertyName("prompt_peak")]
    public int PromptPeak { get; set; }

    /// <summary>When <see cref="PromptPeak"/> was seen.</summary>
    [JsonPropertyName("prompt_peak_at")]
    public DateTimeOffset? PromptPeakAt { get; set; }

    /// <summary>Manual pins from <c>dslactl convert</c>.</summary>
    [JsonPropertyName("pins")]
    public IReadOnlyList<LayerPin> Pins { get; set; } = [];

    /// <summary>The layers that should run as DSLA: the policy's layers and the DSLA pins, minus the attention pins.</summary>
    public IReadOnlyList<int> DesiredLayers()
    {
        var attention = Pins.Where(p => !p.Dsla).Select(p => p.Layer).ToHashSet();
        return PolicyLayers.Concat(Pins.Where(p => p.Dsla).Select(p => p.Layer)).Where(l => !attention.Contains(l)).Distinct().Order().ToList();
    }
}

/// <summary>What the rule did for a service on one evaluation.</summary>
public enum DecisionAction
{
    /// <summary>Layers unchanged.</summary>
    Hold,
    /// <summary>Layers converted to DSLA.</summary>
    Convert,
    /// <summary>Layers reverted to attention.</summary>
    Revert,
}

/// <summary>One service's decision.</summary>
/// <param name="ServiceId">Service id.</param>
/// <param name="Action">Convert, revert or hold.</param>
/// <param name="Changed">Layers converted or reverted by this decision.</param>
/// <param name="DslaLayers">Every layer that should run as DSLA afterwards (sorted).</param>
/// <param name="CapLayers">The service's cap in layers (MCR bucket, global and override caps).</param>
/// <param name="Reason">Why, in words an operator reads.</param>
/// <param name="State">The state to keep for the next evaluation.</param>
public sealed record ServiceDecision(string ServiceId, DecisionAction Action, IReadOnlyList<int> Changed, IReadOnlyList<int> DslaLayers, int CapLayers, string Reason, ServiceDecisionState State);

/// <summary>
/// The conversion rule as a pure function: (policy, services' metrics, previous state, time) → desired DSLA layers.
/// The controller's live loop and the dry-run replay both call it.
/// </summary>
/// <remarks>
/// Per service: the cap is the MCR of the longest current prompt (held for <c>prompt_window_ms</c>), limited by the global
/// and per-service caps. If the layers exceed the cap they are reverted, newest first. Otherwise, if any trigger is at or
/// above its high mark, the next <c>step_layers</c> layers in sensitivity order are converted up to the cap; if every
/// trigger is at or below its low mark, the newest converted layers are reverted. Any step waits for the cooldown since
/// the previous one. Services without fresh metrics are held. Then the fleet cap cancels conversions (and, if still over,
/// reverts) until the fleet's DSLA layers fit.
/// </remarks>
public static class DecisionEngine
{
    /// <summary>Decides every service, applying the fleet cap across them.</summary>
    public static IReadOnlyList<ServiceDecision> Decide(ConversionPolicy policy, IReadOnlyList<ServiceView> services, IReadOnlyDictionary<string, ServiceDecisionState> states, DateTimeOffset now)
    {
        ArgumentNullException.ThrowIfNull(policy);
        ArgumentNullException.ThrowIfNull(services);
        ArgumentNullException.ThrowIfNull(states);
        var decisions = services.Select(s => DecideService(policy, s, states.GetValueOrDefault(s.Id) ?? ServiceDecisionState.Empty, now)).ToList();
        var limit = (int)Math.Floor(policy.FleetMaxDslaFraction * services.Sum(s => s.LayerCount));
        var total = decisions.Sum(d => d.DslaLayers.Count);
        if (total <= limit)
        {
            return decisions;
        }
        // Cancel conversions first (largest step first, then by id for determinism).
        foreach (var index in Enumerable.Range(0, decisions.Count).Where(i => decisions[i].Action == DecisionAction.Convert)
                     .OrderByDescending(i => decisions[i].Changed.Count).ThenBy(i => decisions[i].ServiceId, StringComparer.Ordinal).ToList())
        {
            if (total <= limit)
            {
                break;
            }
            var decision = decisions[index];
            var previous = states.GetValueOrDefault(decision.ServiceId) ?? ServiceDecisionState.Empty;
            var held = decision.State with { PolicyLayers = previous.PolicyLayers, LastStepAt = previous.LastStepAt };
            total -= decision.Changed.Count;
            decisions[index] = decision with
            {
                Action = DecisionAction.Hold,
                Changed = [],
                DslaLayers = held.DesiredLayers(),
                State = held,
                Reason = $"fleet cap {limit} layers reached ({decision.Reason})",
            };
        }
        // Still over (the cap was lowered): revert one step on the most converted services whose cooldown allows.
        foreach (var index in Enumerable.Range(0, decisions.Count).OrderByDescending(i => decisions[i].State.PolicyLayers.Count).ThenBy(i => decisions[i].ServiceId, StringComparer.Ordinal).ToList())
        {
            if (total <= limit)
            {
                break;
            }
            var decision = decisions[index];
            var state = decision.State;
            if (state.PolicyLayers.Count == 0 || decision.Action != DecisionAction.Hold || !CooledDown(policy, decision.ServiceId, state, now))
            {
                continue;
            }
            var count = Math.Min(Math.Min(Step(policy, decision.ServiceId), state.PolicyLayers.Count), total - limit);
            var reverted = state.PolicyLayers.TakeLast(count).Reverse().ToList();
            var next = state with { PolicyLayers = state.PolicyLayers.SkipLast(count).ToList(), LastStepAt = now };
            total -= count;
            decisions[index] = decision with { Action = DecisionAction.Revert, Changed = reverted, DslaLayers = next.DesiredLayers(), State = next, Reason = $"over the fleet cap of {limit} layers" };
        }
        return decisions;
    }

    /// <summary>Decides one service (no fleet cap).</summary>
    public static ServiceDecision DecideService(ConversionPolicy policy, ServiceView service, ServiceDecisionState state, DateTimeOffset now)
    {
        ArgumentNullException.ThrowIfNull(policy);
        ArgumentNullException.ThrowIfNull(service);
        ArgumentNullException.ThrowIfNull(state);
        var pins = state.Pins.Where(p => p.Until is null || p.Until > now).ToList();
        state = state with { Pins = pins };
        var metrics = service.Metrics;
        if (metrics is null || now - metrics.Timestamp > TimeSpan.FromMilliseconds(policy.MetricsMaxAgeMs))
        {
            var age = metrics is null ? "no metrics" : $"metrics are {(now - metrics.Timestamp).TotalSeconds.ToString("F1", CultureInfo.InvariantCulture)} s old";
            return Hold(service, state, Cap(policy, service, state.PromptPeak), $"{age}; holding");
        }

        // The longest prompt in the mix, held for the prompt window so the MCR bucket does not flap between requests.
        if (metrics.MaxPromptTokens >= state.PromptPeak || state.PromptPeakAt is null || now - state.PromptPeakAt.Value >= TimeSpan.FromMilliseconds(policy.PromptWindowMs))
        {
            state = state with { PromptPeak = metrics.MaxPromptTokens, PromptPeakAt = now };
        }
        var prompt = state.PromptPeak;
        var cap = Cap(policy, service, prompt);
        var pinnedDsla = pins.Where(p => p.Dsla).Select(p => p.Layer).ToHashSet();
        var pinnedAttention = pins.Where(p => !p.Dsla).Select(p => p.Layer).ToHashSet();
        // Pinned layers are the operator's; the policy's own layers drop any that a pin now decides.
        var layers = state.PolicyLayers.Where(l => !pinnedDsla.Contains(l) && !pinnedAttention.Contains(l) && l >= 0 && l < service.LayerCount).ToList();
        state = state with { PolicyLayers = layers };
        var room = Math.Max(0, cap - pinnedDsla.Count);
        var step = Step(policy, service.Id);
        var cooled = CooledDown(policy, service.Id, state, now);
        var cooldownLeft = state.LastStepAt is { } last ? TimeSpan.FromMilliseconds(Cooldown(policy, service.Id)) - (now - last) : TimeSpan.Zero;

        if (layers.Count > room)
        {
            if (!cooled)
            {
                return Hold(service, state, cap, $"over the cap ({layers.Count + pinnedDsla.Count}/{cap}); cooling down {Seconds(cooldownLeft)}");
            }
            return Revert(service, state, cap, Math.Min(step, layers.Count - room), now, $"over the cap of {cap} layers ({CapReason(policy, service, prompt)})");
        }

        var triggers = policy.Overrides.GetValueOrDefault(service.Id)?.Triggers ?? policy.Triggers;
        var (high, calm, signals) = Pressure(triggers, metrics, prompt);
        if (high)
        {
            if (layers.Count >= room)
            {
                return Hold(service, state, cap, $"pressure ({signals}) but at the cap of {cap} layers ({CapReason(policy, service, prompt)})");
            }
            var candidates = service.SensitivityOrder.Where(l => l >= 0 && l < service.LayerCount && !layers.Contains(l) && !pinnedDsla.Contains(l) && !pinnedAttention.Contains(l))
                .Take(Math.Min(step, room - layers.Count)).ToList();
            if (candidates.Count == 0)
            {
                return Hold(service, state, cap, $"pressure ({signals}) but no layer left to convert");
            }
            if (!cooled)
            {
                return Hold(service, state, cap, $"pressure ({signals}); cooling down {Seconds(cooldownLeft)}");
            }
            var next = state with { PolicyLayers = [.. layers, .. candidates], LastStepAt = now };
            return new ServiceDecision(service.Id, DecisionAction.Convert, candidates, next.DesiredLayers(), cap, $"pressure ({signals}); cap {cap} ({CapReason(policy, service, prompt)})", next);
        }
        if (calm && layers.Count > 0)
        {
            if (!cooled)
            {
                return Hold(service, state, cap, $"calm ({signals}); cooling down {Seconds(cooldownLeft)}");
            }
            return Revert(service, state, cap, Math.Min(step, layers.Count), now, $"calm ({signals})");
        }
        return Hold(service, state, cap, calm ? $"calm ({signals})" : $"between the marks ({signals})");
    }

    /// <summary>The MCR for a prompt length: the bucket with the largest minimum not above it.</summary>
    public static double MaxConversionRate(ConversionPolicy policy, int promptTokens)
    {
        ArgumentNullException.ThrowIfNull(policy);
        var rate = 0.0;
        foreach (var bucket in policy.MaxConversionRate.OrderBy(b => b.MinPromptTokens))
        {
            if (promptTokens >= bucket.MinPromptTokens)
            {
                rate = bucket.MaxDslaFraction;
            }
        }
        return rate;
    }

    /// <summary>The most layers of a service that may be DSLA for a prompt length.</summary>
    public static int Cap(ConversionPolicy policy, ServiceView service, int promptTokens)
    {
        ArgumentNullException.ThrowIfNull(policy);
        ArgumentNullException.ThrowIfNull(service);
        var entry = policy.Overrides.GetValueOrDefault(service.Id);
        if (entry?.Disabled == true)
        {
            return 0;
        }
        // A small epsilon so that 0.125 × 32 is 4 layers, not 3 after rounding noise.
        var fraction = Math.Min(MaxConversionRate(policy, promptTokens), entry?.MaxDslaFraction ?? policy.GlobalMaxDslaFraction);
        return Math.Clamp((int)Math.Floor((fraction * service.LayerCount) + 1e-9), 0, service.LayerCount);
    }

    private static string CapReason(ConversionPolicy policy, ServiceView service, int prompt)
    {
        var entry = policy.Overrides.GetValueOrDefault(service.Id);
        if (entry?.Disabled == true)
        {
            return "disabled by override";
        }
        var mcr = MaxConversionRate(policy, prompt);
        var limit = entry?.MaxDslaFraction ?? policy.GlobalMaxDslaFraction;
        var what = entry?.MaxDslaFraction is null ? "global cap" : "override cap";
        return mcr <= limit
            ? $"MCR {Percent(mcr)} for prompts up to {prompt} tokens"
            : $"{what} {Percent(limit)}";
    }

    private static (bool High, bool Calm, string Signals) Pressure(PolicyTriggers triggers, ServiceMetricsRecord metrics, int prompt)
    {
        var high = false;
        var calm = true;
        var parts = new List<string>();
        void Check(string name, Watermarks? marks, double value, string format)
        {
            if (marks is null)
            {
                return;
            }
            var text = value.ToString(format, CultureInfo.InvariantCulture);
            if (value >= marks.High)
            {
                high = true;
                parts.Add($"{name} {text} ≥ {marks.High.ToString(format, CultureInfo.InvariantCulture)}");
            }
            else if (value > marks.Low)
            {
                calm = false;
                parts.Add($"{name} {text}");
            }
            else
            {
                parts.Add($"{name} {text} ≤ {marks.Low.ToString(format, CultureInfo.InvariantCulture)}");
            }
        }
        Check("queue", triggers.QueueDepth, metrics.QueueDepth, "0.##");
        Check("kv", triggers.KvUsage, metrics.KvTotalBytes > 0 ? (double)metrics.KvUsedBytes / metrics.KvTotalBytes : 0, "0.00");
        Check("prompt", triggers.PromptTokens, prompt, "0");
        return (high, calm && !high, string.Join(", ", parts));
    }

    private static ServiceDecision Hold(ServiceView service, ServiceDecisionState state, int cap, string reason) =>
        new(service.Id, DecisionAction.Hold, [], state.DesiredLayers(), cap, reason, state);

    private static ServiceDecision Revert(ServiceView service, ServiceDecisionState state, int cap, int count, DateTimeOffset now, string reason)
    {
        var reverted = state.PolicyLayers.TakeLast(count).Reverse().ToList();
        var next = state with { PolicyLayers = state.PolicyLayers.SkipLast(count).ToList(), LastStepAt = now };
        return new ServiceDecision(service.Id, DecisionAction.Revert, reverted, next.DesiredLayers(), cap, reason, next);
    }

    private static bool CooledDown(ConversionPolicy policy, string id, ServiceDecisionState state, DateTimeOffset now) =>
        state.LastStepAt is not { } last || now - last >= TimeSpan.FromMilliseconds(Cooldown(policy, id));

    private static int Cooldown(ConversionPolicy policy, string id) => policy.Overrides.GetValueOrDefault(id)?.CooldownMs ?? policy.CooldownMs;

    private static int Step(ConversionPolicy policy, string id) => policy.Overrides.GetValueOrDefault(id)?.StepLayers ?? policy.StepLayers;

    private static string Percent(double fraction) => (fraction * 100).ToString("0.#", CultureInfo.InvariantCulture) + "%";

    private static string Seconds(TimeSpan span) => $"{Math.Max(0, span.TotalSeconds).ToString("F1", CultureInfo.InvariantCulture)} s";
}

using DslaMesh.Fleet;
using DslaMesh.Policy;
using Microsoft.Extensions.Time.Testing;

namespace DslaMesh.Controller.Tests.Policy;

/// <summary>The pure decision rule: MCR buckets, hysteresis, cooldown, LIFO revert, overrides, caps, pins.</summary>
public sealed class DecisionEngineTests
{
    private static readonly int[] Order32 = [.. Enumerable.Range(0, 32).Reverse()];
    private readonly FakeTimeProvider _time = new(new DateTimeOffset(2026, 1, 1, 0, 0, 0, TimeSpan.Zero));

    private static ConversionPolicy Policy(int cooldownMs = 1000) => new()
    {
        CooldownMs = cooldownMs,
        PromptWindowMs = 0,
        Triggers = new PolicyTriggers { QueueDepth = new Watermarks(8, 2), KvUsage = new Watermarks(0.9, 0.5) },
    };

    private ServiceView View(string id = "a", int queue = 0, int prompt = 0, double kv = 0, int layers = 32, DateTimeOffset? at = null) =>
        new(id, layers, layers == 32 ? Order32 : [.. Enumerable.Range(0, layers).Reverse()], new ServiceMetricsRecord(id, at ?? _time.GetUtcNow(), queue, 1, new Dictionary<string, int>(), prompt,
            (long)(kv * 1000), 1000, 0.1, 0.2, 0.01, 0.02, [], layers, 0, false));

    /// <summary>Runs the rule for one service, keeping its state, with the fake clock advanced by each step.</summary>
    private ServiceDecision Step(ConversionPolicy policy, ref ServiceDecisionState state, ServiceView view, TimeSpan? advance = null)
    {
        _time.Advance(advance ?? TimeSpan.FromSeconds(1));
        view = view with { Metrics = view.Metrics! with { Timestamp = _time.GetUtcNow() } };
        var decision = DecisionEngine.DecideService(policy, view, state, _time.GetUtcNow());
        state = decision.State;
        return decision;
    }

    [Theory]
    [InlineData(0, 4)]        // < 2k: 12.5% of 32
    [InlineData(2047, 4)]
    [InlineData(2048, 8)]     // 2-4k: 25%
    [InlineData(4096, 12)]    // 4-8k: 37.5%
    [InlineData(8191, 12)]
    [InlineData(8192, 16)]    // >= 8k: 50%
    [InlineData(100_000, 16)]
    public void Paper_mcr_buckets_cap_the_conversion(int prompt, int cap)
    {
        var policy = Policy(cooldownMs: 0);
        var state = ServiceDecisionState.Empty;
        ServiceDecision decision;
        do
        {
            decision = Step(policy, ref state, View(queue: 20, prompt: prompt));
        }
        while (decision.Action == DecisionAction.Convert);
        Assert.Equal(cap, decision.CapLayers);
        Assert.Equal(cap, decision.DslaLayers.Count);
        Assert.Contains("at the cap", decision.Reason);
        // Converted in sensitivity order: the least sensitive (here: the last) layers first.
        Assert.Equal(Order32.Take(cap).Order(), decision.DslaLayers);
    }

    [Fact]
    public void Converts_above_the_high_mark_holds_between_the_marks_and_reverts_lifo_below_the_low_mark()
    {
        var policy = Policy(cooldownMs: 0);
        var state = ServiceDecisionState.Empty;
        var first = Step(policy, ref state, View(queue: 8, prompt: 9000));
        Assert.Equal(DecisionAction.Convert, first.Action);
        Assert.Equal([31], first.Changed);
        Assert.Contains("queue 8 ≥ 8", first.Reason);
        Assert.Equal([30], Step(policy, ref state, View(queue: 9, prompt: 9000)).Changed);
        Assert.Equal([29], Step(policy, ref state, View(queue: 1, kv: 0.95, prompt: 9000)).Changed);   // KV alone is enough

        // Between the marks (queue 5: below high 8, above low 2): hold, whatever the cooldown.
        var held = Step(policy, ref state, View(queue: 5, prompt: 9000));
        Assert.Equal(DecisionAction.Hold, held.Action);
        Assert.Contains("between the marks", held.Reason);
        Assert.Equal([29, 30, 31], held.DslaLayers);

        // Calm only when every trigger is at or below its low mark: KV at 0.6 keeps it.
        Assert.Equal(DecisionAction.Hold, Step(policy, ref state, View(queue: 0, kv: 0.6, prompt: 9000)).Action);
        var reverted = Step(policy, ref state, View(queue: 2, kv: 0.5, prompt: 9000));
        Assert.Equal(DecisionAction.Revert, reverted.Action);
        Assert.Equal([29], reverted.Changed);      // last converted, first reverted
        Assert.Equal([30], Step(policy, ref state, View(queue: 0, prompt: 9000)).Changed);
        Assert.Equal([31], Step(policy, ref state, View(queue: 0, prompt: 9000)).Changed);
        Assert.Equal(DecisionAction.Hold, Step(policy, ref state, View(queue: 0, prompt: 9000)).Action);
    }

    [Fact]
    public void Cooldown_spaces_steps_in_both_directions()
    {
        var policy = Policy(cooldownMs: 2000);
        var state = ServiceDecisionState.Empty;
        Assert.Equal(DecisionAction.Convert, Step(policy, ref state, View(queue: 20, prompt: 9000), TimeSpan.Zero).Action);
        var cooling = Step(policy, ref state, View(queue: 20, prompt: 9000), TimeSpan.FromMilliseconds(1999));
        Assert.Equal(DecisionAction.Hold, cooling.Action);
        Assert.Contains("cooling down", cooling.Reason);
        Assert.Equal(DecisionAction.Convert, Step(policy, ref state, View(queue: 20, prompt: 9000), TimeSpan.FromMilliseconds(1)).Action);
        // Load drops right after a step: the revert also waits for the cooldown.
        Assert.Equal(DecisionAction.Hold, Step(policy, ref state, View(queue: 0, prompt: 9000), TimeSpan.FromMilliseconds(500)).Action);
        Assert.Equal(DecisionAction.Revert, Step(policy, ref state, View(queue: 0, prompt: 9000), TimeSpan.FromMilliseconds(1500)).Action);
        Assert.Equal([31], state.PolicyLayers);
    }

    [Fact]
    public void Shorter_prompts_lower_the_cap_and_the_excess_is_reverted_after_the_prompt_window()
    {
        var policy = Policy(cooldownMs: 0) with { PromptWindowMs = 3000, StepLayers = 4 };
        var state = ServiceDecisionState.Empty;
        for (var i = 0; i < 4; i++)
        {
            Step(policy, ref state, View(queue: 20, prompt: 9000));
        }
        Assert.Equal(16, state.PolicyLayers.Count);
        // Long prompts left 1 s ago: the window still counts them.
        Assert.Equal(DecisionAction.Hold, Step(policy, ref state, View(queue: 20, prompt: 100)).Action);
        Assert.Equal(12, Step(policy, ref state, View(queue: 20, prompt: 100), TimeSpan.FromSeconds(2)).DslaLayers.Count);
        var over = Step(policy, ref state, View(queue: 20, prompt: 100));
        Assert.Equal(DecisionAction.Revert, over.Action);
        Assert.Contains("over the cap of 4", over.Reason);
        Assert.Equal(DecisionAction.Revert, Step(policy, ref state, View(queue: 20, prompt: 100)).Action);
        var atCap = Step(policy, ref state, View(queue: 20, prompt: 100));
        Assert.Equal(DecisionAction.Hold, atCap.Action);
        Assert.Equal(4, atCap.DslaLayers.Count);
    }

    [Fact]
    public void Per_service_override_and_global_cap_limit_conversion()
    {
        var policy = Policy(cooldownMs: 0) with
        {
            StepLayers = 32,
            GlobalMaxDslaFraction = 0.25,
            Overrides = new Dictionary<string, ServiceOverride>
            {
                ["small"] = new() { MaxDslaFraction = 0.125 },
                ["off"] = new() { Disabled = true },
                ["eager"] = new() { Triggers = new PolicyTriggers { QueueDepth = new Watermarks(1, 0), KvUsage = null } },
            },
        };
        var views = new[] { View("a", queue: 20, prompt: 9000), View("small", queue: 20, prompt: 9000), View("off", queue: 20, prompt: 9000), View("eager", queue: 1, prompt: 9000) };
        var decisions = DecisionEngine.Decide(policy, views, new Dictionary<string, ServiceDecisionState>(), _time.GetUtcNow()).ToDictionary(d => d.ServiceId);
        Assert.Equal(8, decisions["a"].DslaLayers.Count);        // global cap 25% < MCR 50%
        Assert.Contains("global cap 25%", decisions["a"].Reason);
        Assert.Equal(4, decisions["small"].DslaLayers.Count);    // override 12.5%
        Assert.Empty(decisions["off"].DslaLayers);
        Assert.Equal(0, decisions["off"].CapLayers);
        Assert.Equal(8, decisions["eager"].DslaLayers.Count);    // queue 1 is high under its own triggers
    }

    [Fact]
    public void Fleet_cap_cancels_conversions_beyond_the_fleet_limit()
    {
        var policy = Policy(cooldownMs: 0) with { StepLayers = 16, FleetMaxDslaFraction = 0.25 };
        var views = new[] { View("a", queue: 20, prompt: 9000), View("b", queue: 20, prompt: 9000) };
        var decisions = DecisionEngine.Decide(policy, views, new Dictionary<string, ServiceDecisionState>(), _time.GetUtcNow());
        // 25% of 64 layers = 16: one service's step of 16 fits, the other is held.
        Assert.Equal(16, decisions.Sum(d => d.DslaLayers.Count));
        Assert.Single(decisions, d => d.Action == DecisionAction.Hold && d.Reason.StartsWith("fleet cap 16", StringComparison.Ordinal));
    }

    [Fact]
    public void Stale_or_missing_metrics_hold_the_layers()
    {
        var policy = Policy(cooldownMs: 0);
        var state = ServiceDecisionState.Empty with { PolicyLayers = [31, 30] };
        var old = View(queue: 0, at: _time.GetUtcNow() - TimeSpan.FromSeconds(6));
        var decision = DecisionEngine.DecideService(policy, old, state, _time.GetUtcNow());
        Assert.Equal(DecisionAction.Hold, decision.Action);
        Assert.Contains("old; holding", decision.Reason);
        Assert.Equal([30, 31], decision.DslaLayers);
        var none = DecisionEngine.DecideService(policy, old with { Metrics = null }, state, _time.GetUtcNow());
        Assert.Contains("no metrics", none.Reason);
    }

    [Fact]
    public void Manual_pins_override_the_policy_until_they_expire()
    {
        var policy = Policy(cooldownMs: 0);
        var until = _time.GetUtcNow() + TimeSpan.FromSeconds(5);
        var state = ServiceDecisionState.Empty with { PolicyLayers = [31], Pins = [new LayerPin(0, true, until), new LayerPin(31, false, until)] };
        var calm = Step(policy, ref state, View(queue: 0, prompt: 9000));
        Assert.Equal([0], calm.DslaLayers);                     // pinned DSLA stays, pinned attention wins over the policy
        var busy = Step(policy, ref state, View(queue: 20, prompt: 100));
        Assert.Equal([0, 30], busy.DslaLayers);                // 31 is pinned to attention, so the next in order is 30
        Assert.Equal(4, busy.CapLayers);
        _time.Advance(TimeSpan.FromSeconds(5));
        var expired = DecisionEngine.DecideService(policy, View(queue: 5, prompt: 100), state, _time.GetUtcNow());
        Assert.Empty(expired.State.Pins);
        Assert.DoesNotContain(0, expired.DslaLayers);
    }
}

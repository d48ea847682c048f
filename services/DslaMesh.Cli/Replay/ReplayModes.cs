using System.Globalization;
using DslaMesh.Policy;

namespace DslaMesh.Cli.Replay;

/// <summary>
/// One way of serving a replay: the controller policy it sets, and the DSLA layer count every service must reach before
/// the replay starts (null: the adaptive policy starts from all-attention and moves on its own).
/// </summary>
public sealed record ReplayMode(string Name, string Description, string PolicyJson, double? StaticFraction);

/// <summary>The modes <c>dslactl bench replay</c> compares.</summary>
public static class ReplayModes
{
    /// <summary>The default comparison: static all-attention, adaptive, static 25% and 50% DSLA.</summary>
    public const string Default = "attention,adaptive,dsla25,dsla50";

    /// <summary>
    /// Parses <c>attention</c>, <c>adaptive</c> or <c>dslaNN</c> (NN percent of every service's layers, static).
    /// </summary>
    public static ReplayMode Parse(string name, ConversionPolicy adaptive)
    {
        ArgumentNullException.ThrowIfNull(name);
        ArgumentNullException.ThrowIfNull(adaptive);
        if (name == "adaptive")
        {
            return new ReplayMode(name, adaptive.Description ?? "adaptive", PolicyParser.Serialize(adaptive), null);
        }
        if (name == "attention")
        {
            return Static(name, 0);
        }
        if (name.StartsWith("dsla", StringComparison.Ordinal) && int.TryParse(name.AsSpan(4), NumberStyles.None, CultureInfo.InvariantCulture, out var percent) && percent is > 0 and <= 100)
        {
            return Static(name, percent / 100.0);
        }
        throw new ArgumentException($"--modes: '{name}' is not attention, adaptive or dslaNN (NN = 1..100 percent of layers, e.g. dsla25).");
    }

    /// <summary>
    /// The adaptive policy the replay uses when none is given: the controller's built-in default (the paper's MCR table,
    /// queue and KV triggers) with the table's prompt lengths × <paramref name="lengthScale"/>, so a trace whose prompts
    /// were scaled down meets the same buckets.
    /// </summary>
    public static ConversionPolicy ScaledDefault(double lengthScale) => ConversionPolicy.Default with
    {
        Description = string.Create(CultureInfo.InvariantCulture, $"bench replay: adaptive (built-in default, MCR prompt lengths × {lengthScale:G4})"),
        MaxConversionRate = [.. ConversionPolicy.PaperRates.Select(b => b with { MinPromptTokens = (int)(b.MinPromptTokens * lengthScale) })],
    };

    /// <summary>The DSLA layers a static fraction gives a service (the controller's cap: ⌊fraction × layers⌋).</summary>
    public static int StaticLayers(double fraction, int layerCount) => (int)Math.Floor(fraction * layerCount + 1e-9);

    private static ReplayMode Static(string name, double fraction)
    {
        // Pressure always (queue ≥ 0) and a cap of exactly the fraction: every service converts up to it at once and
        // holds; a fraction of 0 makes the cap 0, so everything converted is reverted.
        var policy = new ConversionPolicy
        {
            Description = string.Create(CultureInfo.InvariantCulture, $"bench replay: static {fraction:P0} DSLA"),
            MaxConversionRate = [new ConversionRateBucket(0, fraction)],
            GlobalMaxDslaFraction = fraction,
            Triggers = new PolicyTriggers { QueueDepth = new Watermarks(0, 0), KvUsage = null, PromptTokens = null },
            StepLayers = 1024,
            CooldownMs = 0,
        };
        return new ReplayMode(name, fraction == 0 ? "static all-attention" : string.Create(CultureInfo.InvariantCulture, $"static {fraction:P0} DSLA"), PolicyParser.Serialize(policy), fraction);
    }
}

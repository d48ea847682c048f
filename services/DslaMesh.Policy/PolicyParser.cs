using System.Globalization;
using System.Text.Encodings.Web;
using System.Text.Json;
using System.Text.Json.Serialization.Metadata;

namespace DslaMesh.Policy;

/// <summary>The outcome of reading a policy: the policy when valid, otherwise every reason it was refused.</summary>
public sealed record PolicyParseResult(ConversionPolicy? Policy, IReadOnlyList<string> Errors)
{
    /// <summary>Whether the policy can be applied.</summary>
    public bool IsValid => Policy is not null && Errors.Count == 0;
}

/// <summary>Reads, validates and writes policies. Each error names the JSON path it is about.</summary>
public static class PolicyParser
{
    // Operators read the stored JSON: keep apostrophes, '<' and non-ASCII text as they are.
    private static readonly JsonTypeInfo<ConversionPolicy> Writer = (JsonTypeInfo<ConversionPolicy>)new JsonSerializerOptions(PolicyJsonContext.Default.Options)
    {
        Encoder = JavaScriptEncoder.UnsafeRelaxedJsonEscaping,
    }.GetTypeInfo(typeof(ConversionPolicy));

    /// <summary>Parses and validates policy JSON.</summary>
    public static PolicyParseResult Parse(string json)
    {
        ConversionPolicy? policy;
        try
        {
            policy = JsonSerializer.Deserialize(json, PolicyJsonContext.Default.ConversionPolicy);
        }
        catch (JsonException e)
        {
            return new PolicyParseResult(null, [Describe(e)]);
        }
        if (policy is null)
        {
            return new PolicyParseResult(null, ["$: the policy is null; expected a JSON object"]);
        }
        var errors = Validate(policy);
        return new PolicyParseResult(errors.Count == 0 ? policy : null, errors);
    }

    /// <summary>The normalised JSON of a policy (every property written).</summary>
    public static string Serialize(ConversionPolicy policy) => JsonSerializer.Serialize(policy, Writer);

    /// <summary>Checks the rules the JSON types cannot express.</summary>
    public static IReadOnlyList<string> Validate(ConversionPolicy policy)
    {
        ArgumentNullException.ThrowIfNull(policy);
        var errors = new List<string>();
        var rates = policy.MaxConversionRate;
        if (rates.Count == 0)
        {
            errors.Add("max_conversion_rate: give at least one bucket");
        }
        else
        {
            if (rates[0].MinPromptTokens != 0)
            {
                errors.Add($"max_conversion_rate[0].min_prompt_tokens: the first bucket must start at 0 tokens, not {rates[0].MinPromptTokens}");
            }
            for (var i = 0; i < rates.Count; i++)
            {
                var bucket = rates[i];
                if (bucket is null)
                {
                    errors.Add($"max_conversion_rate[{i}]: null");
                    continue;
                }
                Fraction(errors, $"max_conversion_rate[{i}].max_dsla_fraction", bucket.MaxDslaFraction);
                if (i > 0 && rates[i - 1] is { } previous && bucket.MinPromptTokens <= previous.MinPromptTokens)
                {
                    errors.Add($"max_conversion_rate[{i}].min_prompt_tokens: buckets must be in increasing order ({bucket.MinPromptTokens} after {previous.MinPromptTokens})");
                }
            }
        }
        Triggers(errors, "triggers", policy.Triggers);
        Range(errors, "step_layers", policy.StepLayers, 1, 1024);
        Range(errors, "cooldown_ms", policy.CooldownMs, 0, 3_600_000);
        Range(errors, "prompt_window_ms", policy.PromptWindowMs, 0, 3_600_000);
        Range(errors, "metrics_max_age_ms", policy.MetricsMaxAgeMs, 100, 3_600_000);
        Fraction(errors, "global_max_dsla_fraction", policy.GlobalMaxDslaFraction);
        Fraction(errors, "fleet_max_dsla_fraction", policy.FleetMaxDslaFraction);
        foreach (var (id, entry) in policy.Overrides)
        {
            var path = $"overrides[\"{id}\"]";
            if (string.IsNullOrWhiteSpace(id))
            {
                errors.Add("overrides: a service id is empty");
            }
            if (entry is null)
            {
                errors.Add($"{path}: null");
                continue;
            }
            if (entry.MaxDslaFraction is { } fraction)
            {
                Fraction(errors, $"{path}.max_dsla_fraction", fraction);
            }
            if (entry.Triggers is { } triggers)
            {
                Triggers(errors, $"{path}.triggers", triggers);
            }
            if (entry.CooldownMs is { } cooldown)
            {
                Range(errors, $"{path}.cooldown_ms", cooldown, 0, 3_600_000);
            }
            if (entry.StepLayers is { } step)
            {
                Range(errors, $"{path}.step_layers", step, 1, 1024);
            }
        }
        return errors;
    }

    private static void Triggers(List<string> errors, string path, PolicyTriggers? triggers)
    {
        if (triggers is null)
        {
            errors.Add($"{path}: required");
            return;
        }
        if (triggers.QueueDepth is null && triggers.KvUsage is null && triggers.PromptTokens is null)
        {
            errors.Add($"{path}: configure at least one of queue_depth, kv_usage, prompt_tokens");
        }
        Marks(errors, $"{path}.queue_depth", triggers.QueueDepth, double.MaxValue);
        Marks(errors, $"{path}.kv_usage", triggers.KvUsage, 1);
        Marks(errors, $"{path}.prompt_tokens", triggers.PromptTokens, double.MaxValue);
    }

    private static void Marks(List<string> errors, string path, Watermarks? marks, double max)
    {
        if (marks is null)
        {
            return;
        }
        if (!double.IsFinite(marks.High) || marks.High < 0 || marks.High > max)
        {
            errors.Add($"{path}.high: {Format(marks.High)} is outside 0..{Format(max)}");
        }
        if (!double.IsFinite(marks.Low) || marks.Low < 0 || marks.Low > max)
        {
            errors.Add($"{path}.low: {Format(marks.Low)} is outside 0..{Format(max)}");
        }
        if (marks.Low > marks.High)
        {
            errors.Add($"{path}: low ({Format(marks.Low)}) must not be above high ({Format(marks.High)})");
        }
    }

    private static void Fraction(List<string> errors, string path, double value)
    {
        if (!double.IsFinite(value) || value < 0 || value > 1)
        {
            errors.Add($"{path}: {Format(value)} is not a fraction in 0..1");
        }
    }

    private static void Range(List<string> errors, string path, int value, int min, int max)
    {
        if (value < min || value > max)
        {
            errors.Add($"{path}: {value} is outside {min}..{max}");
        }
    }

    private static string Format(double value) => value == double.MaxValue ? "∞" : value.ToString("G", CultureInfo.InvariantCulture);

    private static string Describe(JsonException e)
    {
        var where = e.Path is { Length: > 0 } path ? path : "$";
        var at = e.LineNumber is { } line ? $" (line {line + 1}, column {(e.BytePositionInLine ?? 0) + 1})" : "";
        // The serializer's message repeats path and position; keep its first sentence, which says what is wrong.
        var message = e.Message;
        var cut = message.IndexOf(" Path:", StringComparison.Ordinal);
        if (cut > 0)
        {
            message = message[..cut];
        }
        return $"{where}: {message.TrimEnd('.')}{at}";
    }
}

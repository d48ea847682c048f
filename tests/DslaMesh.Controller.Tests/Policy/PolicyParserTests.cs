using DslaMesh.Policy;

namespace DslaMesh.Controller.Tests.Policy;

/// <summary>Policy JSON: defaults, normalisation, and refusals that name the path and the reason.</summary>
public sealed class PolicyParserTests
{
    [Fact]
    public void Empty_object_is_the_paper_default_and_round_trips()
    {
        var parsed = PolicyParser.Parse("{}");
        Assert.True(parsed.IsValid, string.Join("; ", parsed.Errors));
        var policy = parsed.Policy!;
        Assert.Equal([0.125, 0.25, 0.375, 0.5], policy.MaxConversionRate.Select(b => b.MaxDslaFraction));
        Assert.Equal([0, 2048, 4096, 8192], policy.MaxConversionRate.Select(b => b.MinPromptTokens));
        var again = PolicyParser.Parse(PolicyParser.Serialize(policy));
        Assert.True(again.IsValid);
        Assert.Empty(PolicyDiff.Compare(policy, again.Policy!));
    }

    [Fact]
    public void Documented_example_is_valid()
    {
        var parsed = PolicyParser.Parse("""
            {
              // comments and trailing commas are accepted
              "description": "long-context fleet",
              "max_conversion_rate": [
                { "min_prompt_tokens": 0, "max_dsla_fraction": 0.125 },
                { "min_prompt_tokens": 2048, "max_dsla_fraction": 0.25 },
                { "min_prompt_tokens": 4096, "max_dsla_fraction": 0.375 },
                { "min_prompt_tokens": 8192, "max_dsla_fraction": 0.5 },
              ],
              "triggers": {
                "queue_depth": { "high": 8, "low": 2 },
                "kv_usage": { "high": 0.85, "low": 0.6 },
                "prompt_tokens": null
              },
              "step_layers": 1,
              "cooldown_ms": 2000,
              "global_max_dsla_fraction": 0.5,
              "fleet_max_dsla_fraction": 0.4,
              "overrides": { "gpu-7": { "max_dsla_fraction": 0.25, "cooldown_ms": 5000 }, "canary": { "disabled": true } }
            }
            """);
        Assert.True(parsed.IsValid, string.Join("; ", parsed.Errors));
        Assert.Null(parsed.Policy!.Triggers.PromptTokens);
        Assert.True(parsed.Policy.Overrides["canary"].Disabled);
    }

    [Theory]
    [InlineData("""{"cooldown_ms": 100""", "$")]
    [InlineData("""{"cooldwn_ms": 100}""", "cooldwn_ms")]
    [InlineData("""{"cooldown_ms": "fast"}""", "$.cooldown_ms")]
    [InlineData("""{"triggers": null}""", "triggers")]
    [InlineData("null", "$: the policy is null")]
    public void Malformed_json_is_refused_with_where_and_why(string json, string expected)
    {
        var parsed = PolicyParser.Parse(json);
        Assert.False(parsed.IsValid);
        Assert.Contains(expected, Assert.Single(parsed.Errors));
    }

    [Fact]
    public void Invalid_values_are_each_reported_with_their_path()
    {
        var parsed = PolicyParser.Parse("""
            {
              "max_conversion_rate": [ { "min_prompt_tokens": 10, "max_dsla_fraction": 1.5 }, { "min_prompt_tokens": 5, "max_dsla_fraction": 0.5 } ],
              "triggers": { "queue_depth": { "high": 2, "low": 4 }, "kv_usage": { "high": 1.2, "low": 0.5 } },
              "step_layers": 0,
              "cooldown_ms": -1,
              "global_max_dsla_fraction": 2,
              "overrides": { "x": { "max_dsla_fraction": -0.1 } }
            }
            """);
        Assert.False(parsed.IsValid);
        string[] expected =
        [
            "max_conversion_rate[0].min_prompt_tokens: the first bucket must start at 0 tokens, not 10",
            "max_conversion_rate[0].max_dsla_fraction: 1.5 is not a fraction in 0..1",
            "max_conversion_rate[1].min_prompt_tokens: buckets must be in increasing order (5 after 10)",
            "triggers.queue_depth: low (4) must not be above high (2)",
            "triggers.kv_usage.high: 1.2 is outside 0..1",
            "step_layers: 0 is outside 1..1024",
            "cooldown_ms: -1 is outside 0..3600000",
            "global_max_dsla_fraction: 2 is not a fraction in 0..1",
            "overrides[\"x\"].max_dsla_fraction: -0.1 is not a fraction in 0..1",
        ];
        Assert.Equal(expected, parsed.Errors);
    }

    [Fact]
    public void Triggers_need_at_least_one_signal()
    {
        var parsed = PolicyParser.Parse("""{"triggers": {"queue_depth": null, "kv_usage": null}}""");
        Assert.Equal(["triggers: configure at least one of queue_depth, kv_usage, prompt_tokens"], parsed.Errors);
    }
}

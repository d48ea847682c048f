using System.Text.Json;
using System.Text.Json.Nodes;

namespace DslaMesh.Policy;

/// <summary>One difference between two policies, by JSON path.</summary>
public sealed record PolicyChange(string Path, string? Before, string? After);

/// <summary>Compares two policies value by value (the version is ignored).</summary>
public static class PolicyDiff
{
    /// <summary>The paths whose values differ, in path order.</summary>
    public static IReadOnlyList<PolicyChange> Compare(ConversionPolicy before, ConversionPolicy after)
    {
        ArgumentNullException.ThrowIfNull(before);
        ArgumentNullException.ThrowIfNull(after);
        var left = Flatten(before with { Version = 0 });
        var right = Flatten(after with { Version = 0 });
        return left.Keys.Union(right.Keys).Order(StringComparer.Ordinal)
            .Select(path => new PolicyChange(path, left.GetValueOrDefault(path), right.GetValueOrDefault(path)))
            .Where(c => c.Before != c.After)
            .ToList();
    }

    private static Dictionary<string, string> Flatten(ConversionPolicy policy)
    {
        var values = new Dictionary<string, string>(StringComparer.Ordinal);
        Walk(JsonNode.Parse(PolicyParser.Serialize(policy)), "", values);
        return values;
    }

    private static void Walk(JsonNode? node, string path, Dictionary<string, string> values)
    {
        switch (node)
        {
            case JsonObject obj:
                foreach (var (name, child) in obj)
                {
                    Walk(child, path.Length == 0 ? name : $"{path}.{name}", values);
                }
                break;
            case JsonArray array:
                for (var i = 0; i < array.Count; i++)
                {
                    Walk(array[i], $"{path}[{i}]", values);
                }
                break;
            default:
                values[path] = node?.ToJsonString(new JsonSerializerOptions { Encoder = System.Text.Encodings.Web.JavaScriptEncoder.UnsafeRelaxedJsonEscaping }) ?? "null";
                break;
        }
    }
}

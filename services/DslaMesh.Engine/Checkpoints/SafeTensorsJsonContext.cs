using System.Text.Json.Serialization;

namespace DslaMesh.Engine.Checkpoints;

/// <summary>Source-generated JSON metadata for writing safetensors headers and reading shard indexes.</summary>
[JsonSerializable(typeof(Dictionary<string, object>))]
[JsonSerializable(typeof(Dictionary<string, string>))]
[JsonSerializable(typeof(Dictionary<string, long>[]))]
[JsonSerializable(typeof(long[]))]
[JsonSerializable(typeof(long))]
[JsonSerializable(typeof(string))]
[JsonSerializable(typeof(ShardIndex))]
internal sealed partial class SafeTensorsJsonContext : JsonSerializerContext;

/// <summary>The JSON shape of <c>model.safetensors.index.json</c>.</summary>
internal sealed class ShardIndex
{
    [JsonPropertyName("weight_map")] public Dictionary<string, string>? WeightMap { get; set; }
}

using System.Text.Json.Serialization;

namespace DslaMesh.Engine.Diagnostics;

/// <summary>Source-generated JSON for benchmark and kernel-check reports (snake_case, the schema the Python baseline writes).</summary>
[JsonSourceGenerationOptions(PropertyNamingPolicy = JsonKnownNamingPolicy.SnakeCaseLower, WriteIndented = true,
    DefaultIgnoreCondition = JsonIgnoreCondition.Never)]
[JsonSerializable(typeof(BenchmarkReport))]
[JsonSerializable(typeof(IReadOnlyList<Kernels.KernelCheck>))]
public sealed partial class BenchmarkJsonContext : JsonSerializerContext;

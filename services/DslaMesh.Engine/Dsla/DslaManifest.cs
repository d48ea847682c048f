using System.Text.Json;
using System.Text.Json.Serialization;
using DslaMesh.Engine.Models;

namespace DslaMesh.Engine.Dsla;

/// <summary>
/// <c>dsla/manifest.json</c> beside a model: the layer conversion order (sensitivity, lowest attention entropy first),
/// each layer's entropy, and one entry per distilled variant (its weights file, losses, tokens seen).
/// </summary>
public sealed class DslaManifest
{
    /// <summary>Folder, relative to the model folder, that holds DSLA weights and this manifest.</summary>
    public const string FolderName = "dsla";

    /// <summary>The manifest's file name.</summary>
    public const string FileName = "manifest.json";

    [JsonPropertyName("format")] public string Format { get; set; } = DslaLayerSet.FormatName;

    /// <summary>Layers in conversion order: lowest attention entropy (least sensitive) first.</summary>
    [JsonPropertyName("order")] public List<int> Order { get; set; } = [];

    /// <summary>Each layer's last-token attention entropy, by layer index.</summary>
    [JsonPropertyName("entropy")] public List<double> Entropy { get; set; } = [];

    /// <summary>Distilled variants by wire name (dsla, dsla-foldable, gla).</summary>
    [JsonPropertyName("variants")] public Dictionary<string, DslaVariantEntry> Variants { get; set; } = [];

    /// <summary>Anything else the writer recorded (kept on rewrite).</summary>
    [JsonExtensionData] public Dictionary<string, JsonElement>? Extra { get; set; }

    /// <summary>The manifest path for a model folder.</summary>
    public static string PathFor(string modelDirectory) => Path.Combine(modelDirectory, FolderName, FileName);

    /// <summary>Reads the manifest of a model folder, or null when it has none.</summary>
    /// <exception cref="ModelLoadException">The file exists but is malformed.</exception>
    public static DslaManifest? TryLoad(string modelDirectory)
    {
        var path = PathFor(modelDirectory);
        if (!File.Exists(path))
        {
            return null;
        }
        try
        {
            return JsonSerializer.Deserialize(File.ReadAllText(path), DslaManifestJsonContext.Default.DslaManifest)
                ?? throw new ModelLoadException($"'{path}' is empty.");
        }
        catch (JsonException e)
        {
            throw new ModelLoadException($"'{path}' is not a valid DSLA manifest: {e.Message}", e);
        }
    }

    /// <summary>
    /// Writes the manifest into a model folder (creating <c>dsla/</c>), through a temporary file and a rename so a
    /// reader never sees half a manifest.
    /// </summary>
    public void Save(string modelDirectory)
    {
        var path = PathFor(modelDirectory);
        Directory.CreateDirectory(Path.GetDirectoryName(path)!);
        var temp = path + ".tmp";
        File.WriteAllText(temp, JsonSerializer.Serialize(this, DslaManifestJsonContext.Default.DslaManifest) + "\n");
        File.Move(temp, path, overwrite: true);
    }

    /// <summary>The absolute weights path of a variant, or null when the manifest has none for it.</summary>
    public string? WeightsPath(string modelDirectory, string variant) =>
        Variants.TryGetValue(variant, out var entry) ? Path.Combine(modelDirectory, FolderName, entry.File) : null;
}

/// <summary>One distilled variant in a <see cref="DslaManifest"/>.</summary>
public sealed class DslaVariantEntry
{
    /// <summary>Weights file, relative to the <c>dsla/</c> folder.</summary>
    [JsonPropertyName("file")] public string File { get; set; } = "";

    /// <summary>Layers that have weights.</summary>
    [JsonPropertyName("layers")] public List<int> Layers { get; set; } = [];

    /// <summary>Final distillation loss per layer, by layer index (when known).</summary>
    [JsonPropertyName("losses")] public Dictionary<string, double> Losses { get; set; } = [];

    /// <summary>Training tokens seen in total.</summary>
    [JsonPropertyName("tokens_seen")] public long TokensSeen { get; set; }

    /// <summary>
    /// The conversion order the layers were distilled in (chained: layer n was trained with the first n − 1 converted),
    /// so serving at depth n must convert exactly its first n layers. Null when unknown.
    /// </summary>
    [JsonPropertyName("order")]
    [JsonIgnore(Condition = JsonIgnoreCondition.WhenWritingNull)]
    public List<int>? Order { get; set; }

    /// <summary>Optimiser steps of the distillation run (when known).</summary>
    [JsonPropertyName("steps")]
    [JsonIgnore(Condition = JsonIgnoreCondition.WhenWritingNull)]
    public int? Steps { get; set; }

    /// <summary>Wall time of the distillation run in seconds (when known).</summary>
    [JsonPropertyName("wall_seconds")]
    [JsonIgnore(Condition = JsonIgnoreCondition.WhenWritingNull)]
    public double? WallSeconds { get; set; }

    /// <summary>Device the variant was distilled on (when known).</summary>
    [JsonPropertyName("device")]
    [JsonIgnore(Condition = JsonIgnoreCondition.WhenWritingNull)]
    public string? Device { get; set; }

    /// <summary>How <c>dslactl distill</c> made the weights: recipe, per-layer records, KL stage, host.</summary>
    [JsonPropertyName("distillation")]
    [JsonIgnore(Condition = JsonIgnoreCondition.WhenWritingNull)]
    public Distillation.DistillationSummary? Distillation { get; set; }

    /// <summary>Anything else the writer recorded.</summary>
    [JsonExtensionData] public Dictionary<string, JsonElement>? Extra { get; set; }
}

/// <summary>Source-generated JSON for <see cref="DslaManifest"/>.</summary>
[JsonSourceGenerationOptions(WriteIndented = true)]
[JsonSerializable(typeof(DslaManifest))]
internal sealed partial class DslaManifestJsonContext : JsonSerializerContext;

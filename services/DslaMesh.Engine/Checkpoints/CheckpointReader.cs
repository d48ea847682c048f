using System.Text.Json;
using DslaMesh.Engine.Models;
using static TorchSharp.torch;

namespace DslaMesh.Engine.Checkpoints;

/// <summary>
/// All tensors of a Hugging Face checkpoint folder: <c>model.safetensors</c>, or shards listed by
/// <c>model.safetensors.index.json</c>.
/// </summary>
public sealed class CheckpointReader : IDisposable
{
    private readonly Dictionary<string, SafeTensorsFile> _fileByTensor;
    private readonly List<SafeTensorsFile> _files;

    private CheckpointReader(string directory, List<SafeTensorsFile> files, Dictionary<string, SafeTensorsFile> fileByTensor)
    {
        Directory = directory;
        _files = files;
        _fileByTensor = fileByTensor;
    }

    /// <summary>The checkpoint folder.</summary>
    public string Directory { get; }

    /// <summary>Every tensor name in the checkpoint.</summary>
    public IEnumerable<string> Names => _fileByTensor.Keys;

    /// <summary>Opens a checkpoint folder.</summary>
    public static CheckpointReader Open(string directory)
    {
        var index = Path.Combine(directory, "model.safetensors.index.json");
        var single = Path.Combine(directory, "model.safetensors");
        var files = new List<SafeTensorsFile>();
        var byTensor = new Dictionary<string, SafeTensorsFile>(StringComparer.Ordinal);
        try
        {
            if (File.Exists(index))
            {
                ShardIndex parsed;
                try
                {
                    parsed = JsonSerializer.Deserialize(File.ReadAllText(index), SafeTensorsJsonContext.Default.ShardIndex)
                        ?? throw new ModelLoadException($"'{index}' is empty.");
                }
                catch (JsonException e)
                {
                    throw new ModelLoadException($"'{index}' is not valid JSON: {e.Message}", e);
                }
                var weightMap = parsed.WeightMap ?? throw new ModelLoadException($"'{index}' has no 'weight_map'.");
                var opened = new Dictionary<string, SafeTensorsFile>(StringComparer.Ordinal);
                foreach (var (tensor, shard) in weightMap)
                {
                    if (!opened.TryGetValue(shard, out var file))
                    {
                        file = SafeTensorsFile.Open(Path.Combine(directory, shard));
                        opened[shard] = file;
                        files.Add(file);
                    }
                    if (!file.Entries.ContainsKey(tensor))
                    {
                        throw new ModelLoadException($"'{index}' places tensor '{tensor}' in '{shard}', which does not hold it.");
                    }
                    byTensor[tensor] = file;
                }
            }
            else if (File.Exists(single))
            {
                var file = SafeTensorsFile.Open(single);
                files.Add(file);
                foreach (var name in file.Entries.Keys)
                {
                    byTensor[name] = file;
                }
            }
            else
            {
                throw new ModelLoadException($"No weights in '{directory}': expected model.safetensors or model.safetensors.index.json.");
            }
        }
        catch
        {
            files.ForEach(f => f.Dispose());
            throw;
        }
        return new CheckpointReader(directory, files, byTensor);
    }

    /// <summary>Whether the checkpoint holds a tensor.</summary>
    public bool Contains(string name) => _fileByTensor.ContainsKey(name);

    /// <summary>Reads a tensor, checks its shape, converts it to <paramref name="dtype"/> and moves it to <paramref name="device"/>.</summary>
    /// <exception cref="ModelLoadException">The tensor is missing or has another shape; the message names both.</exception>
    public Tensor Read(string name, long[] expectedShape, ScalarType dtype, Device device)
    {
        if (!_fileByTensor.TryGetValue(name, out var file))
        {
            throw new ModelLoadException($"Checkpoint '{Directory}' has no tensor '{name}'.");
        }
        var entry = file.Entries[name];
        if (!entry.Shape.SequenceEqual(expectedShape))
        {
            throw new ModelLoadException($"Tensor '{name}' in '{file.Path}' has shape [{string.Join(", ", entry.Shape)}]; the config implies [{string.Join(", ", expectedShape)}].");
        }
        using var raw = file.Read(name);
        return raw.to(dtype, device);
    }

    /// <inheritdoc/>
    public void Dispose() => _files.ForEach(f => f.Dispose());
}

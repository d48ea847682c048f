using DslaMesh.Engine.Backends;
using DslaMesh.Engine.Dsla;
using DslaMesh.Engine.Tokenization;

namespace DslaMesh.Engine.Models;

/// <summary>A model folder loaded onto a device: the network and, when the folder has one, its tokenizer.</summary>
public sealed class LoadedModel : IDisposable
{
    private LoadedModel(string directory, LlamaForCausalLM model, TextTokenizer? tokenizer, DslaManifest? manifest)
    {
        Directory = directory;
        Model = model;
        Tokenizer = tokenizer;
        Manifest = manifest;
    }

    /// <summary>The DSLA manifest (conversion order, distilled variants), or null when the folder has none.</summary>
    public DslaManifest? Manifest { get; }

    /// <summary>The attached DSLA layers, after <see cref="AttachDsla"/>.</summary>
    public DslaLayerSet? Dsla { get; private set; }

    /// <summary>Layers in conversion order: the manifest's sensitivity order, else last layer first.</summary>
    public IReadOnlyList<int> ConversionOrder => Manifest is { Order.Count: > 0 } m
        ? m.Order
        : Enumerable.Range(0, Model.Config.NumHiddenLayers).Reverse().ToArray();

    /// <summary>
    /// Loads and attaches a distilled variant listed in the manifest; returns false (attaching nothing) when the folder
    /// has no weights for it.
    /// </summary>
    /// <exception cref="ModelLoadException">The manifest lists the variant but its weights cannot be loaded.</exception>
    public bool AttachDsla(string variant)
    {
        if (Manifest?.WeightsPath(Directory, variant) is not { } path)
        {
            return false;
        }
        Dsla?.Dispose();
        Dsla = DslaLayerSet.Load(Model, path);
        return true;
    }

    /// <summary>The checkpoint folder.</summary>
    public string Directory { get; }

    /// <summary>The network.</summary>
    public LlamaForCausalLM Model { get; }

    /// <summary>The tokenizer, or null when the folder has no tokenizer.json.</summary>
    public TextTokenizer? Tokenizer { get; }

    /// <summary>Starts the backend and loads config, weights and tokenizer from <paramref name="directory"/>.</summary>
    /// <exception cref="ModelLoadException">Anything about the folder is missing or malformed.</exception>
    public static LoadedModel Load(string directory, TorchBackendOptions backend, int? maxPositions = null)
    {
        var device = TorchRuntime.Initialize(backend);
        var model = LlamaForCausalLM.Load(directory, TorchRuntime.ResolveDType(backend), device, maxPositions, backend.Kernels);
        try
        {
            var tokenizerPath = Path.Combine(directory, "tokenizer.json");
            var tokenizer = File.Exists(tokenizerPath) ? TextTokenizer.Load(tokenizerPath) : null;
            return new LoadedModel(directory, model, tokenizer, DslaManifest.TryLoad(directory));
        }
        catch
        {
            model.Dispose();
            throw;
        }
    }

    /// <summary>The tokenizer, or a clear error when text was given to a folder without one.</summary>
    public TextTokenizer RequireTokenizer() => Tokenizer
        ?? throw new ModelLoadException($"'{Directory}' has no tokenizer.json; pass token ids instead of text.");

    /// <inheritdoc/>
    public void Dispose()
    {
        Dsla?.Dispose();
        Model.Dispose();
        Tokenizer?.Dispose();
    }
}

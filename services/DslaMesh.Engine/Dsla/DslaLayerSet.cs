using System.Globalization;
using System.Text.RegularExpressions;
using DslaMesh.Engine.Checkpoints;
using DslaMesh.Engine.Inference;
using DslaMesh.Engine.Models;
using static TorchSharp.torch;

namespace DslaMesh.Engine.Dsla;

/// <summary>
/// The attention replacements of one model, all of one <see cref="DslaVariant"/>: builds them from the teacher layers
/// they replace, attaches them to the decoder layers' <see cref="LlamaDecoderLayer.Replacement"/> slots (a forward pass
/// then picks them per its dslaLayers mix), and saves/loads their weights as one safetensors file with tensors named
/// <c>model.layers.{i}.self_attn_dsla.{q_proj.weight, …}</c> and the variant and shapes in the metadata.
/// Disposing the set detaches and frees its layers.
/// </summary>
public sealed partial class DslaLayerSet : IDisposable
{
    /// <summary>Value of the <c>format</c> metadata key in a saved file.</summary>
    public const string FormatName = "dslamesh-dsla";

    private readonly SortedDictionary<int, GatedLinearMixer> _mixers = [];

    private DslaLayerSet(LlamaForCausalLM model, DslaVariant variant)
    {
        Model = model;
        Variant = variant;
    }

    /// <summary>The model whose layers this set replaces.</summary>
    public LlamaForCausalLM Model { get; }

    /// <summary>The variant of every layer in the set.</summary>
    public DslaVariant Variant { get; }

    /// <summary>The variant's wire name (<c>dsla</c>, <c>dsla-foldable</c>, <c>gla</c>).</summary>
    public string VariantName => DslaVariants.Name(Variant);

    /// <summary>Layer indices with a replacement, ascending.</summary>
    public IReadOnlyList<int> Layers => _mixers.Keys.ToList();

    /// <summary>The replacement of a layer.</summary>
    public GatedLinearMixer this[int layer] => _mixers.TryGetValue(layer, out var mixer)
        ? mixer
        : throw new KeyNotFoundException($"Layer {layer} has no {VariantName} replacement in this set.");

    /// <summary>Whether <paramref name="layer"/> has a replacement in this set.</summary>
    public bool Contains(int layer) => _mixers.ContainsKey(layer);

    /// <summary>Bytes of all replacement weights (shared teacher weights excluded).</summary>
    public long WeightBytes => _mixers.Values.Sum(m => m.parameters().Sum(p => p.NumberOfElements * p.ElementSize));

    /// <summary>
    /// A set of <paramref name="variant"/> layers initialised from the teacher for <paramref name="layers"/> (none: an
    /// empty set to <see cref="Add"/> to, as chained distillation does), attached to the model. Layer i uses seed
    /// <paramref name="seed"/> + i.
    /// </summary>
    public static DslaLayerSet Create(LlamaForCausalLM model, DslaVariant variant, IEnumerable<int>? layers = null, long seed = 0)
    {
        ArgumentNullException.ThrowIfNull(model);
        var set = new DslaLayerSet(model, variant);
        try
        {
            foreach (var layer in layers ?? [])
            {
                set.Add(layer, seed + layer);
            }
        }
        catch
        {
            set.Dispose();
            throw;
        }
        return set;
    }

    /// <summary>Builds the replacement of <paramref name="layer"/> from its teacher (seeded) and attaches it.</summary>
    public GatedLinearMixer Add(int layer, long seed)
    {
        CheckLayer(layer);
        if (_mixers.ContainsKey(layer))
        {
            throw new InvalidOperationException($"Layer {layer} already has a {VariantName} replacement in this set.");
        }
        var mixer = Build(layer, seed);
        try
        {
            Attach(layer, mixer);
        }
        catch
        {
            mixer.Dispose();
            throw;
        }
        return mixer;
    }

    /// <summary>Detaches and frees the replacement of <paramref name="layer"/> (its sequences' DSLA states stay in their caches).</summary>
    public void Remove(int layer)
    {
        if (!_mixers.Remove(layer, out var mixer))
        {
            return;
        }
        if (ReferenceEquals(Model.Layers[layer].Replacement, mixer))
        {
            Model.Layers[layer].Replacement = null;
        }
        mixer.Dispose();
    }

    /// <summary>
    /// The per-layer mix for <see cref="LlamaForCausalLM.Forward"/>: true for <paramref name="active"/> layers, which must
    /// all be in the set.
    /// </summary>
    public bool[] Mix(IEnumerable<int> active)
    {
        ArgumentNullException.ThrowIfNull(active);
        var mix = new bool[Model.Layers.Count];
        foreach (var layer in active)
        {
            if (!_mixers.ContainsKey(layer))
            {
                throw new ArgumentException($"Layer {layer} has no {VariantName} replacement in this set, so it cannot run as DSLA.", nameof(active));
            }
            mix[layer] = true;
        }
        return mix;
    }

    /// <summary>The mix with every layer of the set active.</summary>
    public bool[] MixAll() => Mix(_mixers.Keys);

    /// <summary>Turns gradients on or off for every replacement's trainable parameters (shared teacher weights stay frozen).</summary>
    public void SetTrainable(bool trainable)
    {
        foreach (var mixer in _mixers.Values)
        {
            mixer.SetTrainable(trainable);
        }
    }

    /// <summary>
    /// Folds layer <paramref name="layer"/>'s KV caches of the given sequences into DSLA states in one batched pass and
    /// replaces the cache entries (freeing the KV memory), so those sequences can continue with the layer as DSLA.
    /// Returns how many sequences were folded. Only the <c>dsla-foldable</c> variant can fold.
    /// </summary>
    /// <exception cref="InvalidOperationException">The variant cannot fold.</exception>
    public int Fold(IReadOnlyList<SequenceCache> caches, int layer)
    {
        ArgumentNullException.ThrowIfNull(caches);
        return this[layer] switch
        {
            FoldableDslaAttention foldable => foldable.FoldInto(caches, layer, Model.Rotary),
            _ when caches.All(c => c[layer] is not KvState) => 0,
            _ => throw new InvalidOperationException(
                $"The '{VariantName}' variant cannot fold a softmax KV cache into DSLA states; only 'dsla-foldable' can. " +
                $"Convert layer {layer} only for new sequences, or use the foldable variant."),
        };
    }

    /// <summary>Every replacement weight under its checkpoint name.</summary>
    public IReadOnlyDictionary<string, Tensor> CheckpointTensors()
    {
        var result = new Dictionary<string, Tensor>(StringComparer.Ordinal);
        foreach (var (layer, mixer) in _mixers)
        {
            foreach (var (name, parameter) in mixer.named_parameters())
            {
                result[TensorName(layer, name)] = parameter;
            }
        }
        return result;
    }

    /// <summary>The checkpoint name of parameter <paramref name="name"/> of layer <paramref name="layer"/>'s replacement.</summary>
    public static string TensorName(int layer, string name) => $"model.layers.{layer.ToString(CultureInfo.InvariantCulture)}.self_attn_dsla.{name}";

    /// <summary>
    /// Writes the replacement weights to one safetensors file, in their dtype, with metadata: format, variant, layers and
    /// the attention shapes (checked on load). The foldable variant's k/v are the teacher's and are not written.
    /// </summary>
    public void Save(string path, ScalarType? storage = null)
    {
        ArgumentException.ThrowIfNullOrEmpty(path);
        var config = Model.Config;
        var metadata = new Dictionary<string, string>(StringComparer.Ordinal)
        {
            ["format"] = FormatName,
            ["variant"] = VariantName,
            ["layers"] = string.Join(",", _mixers.Keys.Select(l => l.ToString(CultureInfo.InvariantCulture))),
            ["hidden_size"] = config.HiddenSize.ToString(CultureInfo.InvariantCulture),
            ["num_attention_heads"] = config.NumAttentionHeads.ToString(CultureInfo.InvariantCulture),
            ["num_key_value_heads"] = config.NumKeyValueHeads.ToString(CultureInfo.InvariantCulture),
            ["head_dim"] = config.HeadDim.ToString(CultureInfo.InvariantCulture),
        };
        using var scope = NewDisposeScope();
        var tensors = CheckpointTensors();
        if (storage is { } dtype)
        {
            // The mixing scalars γ stay fp32: rounding them would move every mixed output.
            tensors = tensors.ToDictionary(p => p.Key, p => p.Key.EndsWith("." + MixingParameterName, StringComparison.Ordinal) || p.Value.dtype == dtype ? p.Value : p.Value.detach().to(dtype), StringComparer.Ordinal);
        }
        SafeTensorsFile.Write(path, tensors, metadata);
    }

    /// <summary>The name of the per-layer mixing parameter (γ's logits), kept fp32 by <see cref="Save"/>.</summary>
    public const string MixingParameterName = "alpha_list";

    /// <summary>
    /// Loads a file written by <see cref="Save"/> for <paramref name="model"/>: builds and attaches one replacement per
    /// layer found, casting weights to the model's dtype and device.
    /// </summary>
    /// <exception cref="ModelLoadException">Missing file, wrong format or variant, shapes that do not fit the model, or a
    /// missing, misshaped or unexpected tensor; the message names the file and the tensor.</exception>
    public static DslaLayerSet Load(LlamaForCausalLM model, string path)
    {
        ArgumentNullException.ThrowIfNull(model);
        using var file = SafeTensorsFile.Open(path);
        if (!file.Metadata.TryGetValue("variant", out var variantName))
        {
            throw new ModelLoadException($"'{path}' has no 'variant' in its safetensors metadata; it is not a DSLA weights file written by DslaMesh.");
        }
        DslaVariant variant;
        try
        {
            variant = DslaVariants.Parse(variantName);
        }
        catch (ArgumentException e)
        {
            throw new ModelLoadException($"'{path}': {e.Message}", e);
        }
        CheckShape(file, "hidden_size", model.Config.HiddenSize);
        CheckShape(file, "num_attention_heads", model.Config.NumAttentionHeads);
        CheckShape(file, "num_key_value_heads", model.Config.NumKeyValueHeads);
        CheckShape(file, "head_dim", model.Config.HeadDim);

        var byLayer = new SortedDictionary<int, HashSet<string>>();
        foreach (var name in file.Entries.Keys)
        {
            var match = TensorNamePattern().Match(name);
            if (!match.Success)
            {
                throw new ModelLoadException($"'{path}': unexpected tensor '{name}' (DSLA weights are named model.layers.N.self_attn_dsla.*).");
            }
            var layer = int.Parse(match.Groups[1].Value, CultureInfo.InvariantCulture);
            if (layer >= model.Layers.Count)
            {
                throw new ModelLoadException($"'{path}': tensor '{name}' is for layer {layer}, but the model has {model.Layers.Count} layers.");
            }
            if (!byLayer.TryGetValue(layer, out var names))
            {
                byLayer[layer] = names = new HashSet<string>(StringComparer.Ordinal);
            }
            names.Add(match.Groups[2].Value);
        }

        var set = new DslaLayerSet(model, variant);
        try
        {
            foreach (var (layer, names) in byLayer)
            {
                var mixer = set.Build(layer, seed: null);
                try
                {
                    LoadWeights(file, layer, mixer, names);
                }
                catch
                {
                    mixer.Dispose();
                    throw;
                }
                set.Attach(layer, mixer);
            }
        }
        catch
        {
            set.Dispose();
            throw;
        }
        return set;
    }

    /// <summary>Detaches every replacement from the model and frees it.</summary>
    public void Dispose()
    {
        foreach (var layer in _mixers.Keys.ToList())
        {
            Remove(layer);
        }
    }

    private static void LoadWeights(SafeTensorsFile file, int layer, GatedLinearMixer mixer, HashSet<string> names)
    {
        var expected = mixer.named_parameters().ToList();
        foreach (var name in names)
        {
            if (!expected.Any(p => p.name == name))
            {
                throw new ModelLoadException(
                    $"'{file.Path}': unexpected tensor '{TensorName(layer, name)}' for the '{DslaVariants.Name(mixer.Variant)}' variant " +
                    $"(expected: {string.Join(", ", expected.Select(p => p.name))}).");
            }
        }
        using var noGrad = no_grad();
        foreach (var (name, parameter) in expected)
        {
            var key = TensorName(layer, name);
            if (!file.Entries.TryGetValue(key, out var entry))
            {
                throw new ModelLoadException($"'{file.Path}' has no tensor '{key}', which the '{DslaVariants.Name(mixer.Variant)}' layer {layer} needs.");
            }
            if (!entry.Shape.SequenceEqual(parameter.shape))
            {
                throw new ModelLoadException(
                    $"'{file.Path}': tensor '{key}' has shape [{string.Join(", ", entry.Shape)}], but the model needs [{string.Join(", ", parameter.shape)}].");
            }
            using var loaded = file.Read(key);
            using var converted = loaded.to(parameter.dtype, parameter.device);
            parameter.copy_(converted);
        }
    }

    private static void CheckShape(SafeTensorsFile file, string key, int expected)
    {
        if (file.Metadata.TryGetValue(key, out var text) && text != expected.ToString(CultureInfo.InvariantCulture))
        {
            throw new ModelLoadException($"'{file.Path}' was written for {key} = {text}, but the model has {key} = {expected}.");
        }
    }

    private GatedLinearMixer Build(int layer, long? seed)
    {
        var config = Model.Config;
        var teacher = Model.Layers[layer].Attention;
        var (dtype, device) = (Model.DType, Model.Device);
        return (Variant, seed) switch
        {
            (DslaVariant.Dsla, { } s) => DslaAttention.FromTeacher(teacher, config, s),
            (DslaVariant.Dsla, null) => new DslaAttention(config, dtype, device),
            (DslaVariant.DslaFoldable, { } s) => FoldableDslaAttention.FromTeacher(teacher, config, Model.Rotary, s),
            (DslaVariant.DslaFoldable, null) => new FoldableDslaAttention(config, teacher, Model.Rotary),
            (DslaVariant.Gla, { } s) => GlaAttention.FromTeacher(teacher, config, s),
            (DslaVariant.Gla, null) => new GlaAttention(config, dtype, device),
            _ => throw new ArgumentOutOfRangeException(nameof(layer), Variant, "Unknown variant."),
        };
    }

    private void Attach(int layer, GatedLinearMixer mixer)
    {
        var decoder = Model.Layers[layer];
        if (decoder.Replacement is not null)
        {
            throw new InvalidOperationException($"Layer {layer} already has a replacement attached; remove it (or dispose its set) first.");
        }
        decoder.Replacement = mixer;
        _mixers[layer] = mixer;
    }

    private void CheckLayer(int layer)
    {
        if (layer < 0 || layer >= Model.Layers.Count)
        {
            throw new ArgumentOutOfRangeException(nameof(layer), layer, $"The model has {Model.Layers.Count} layers.");
        }
    }

    [GeneratedRegex(@"^model\.layers\.(\d+)\.self_attn_dsla\.(.+)$", RegexOptions.CultureInvariant)]
    private static partial Regex TensorNamePattern();
}

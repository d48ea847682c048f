using DslaMesh.Engine.Checkpoints;
using DslaMesh.Engine.Inference;
using TorchSharp.Modules;
using TorchSharp.Utils;
using static TorchSharp.torch;

namespace DslaMesh.Engine.Models;

/// <summary>
/// A Llama-family causal language model with Hugging Face parameter names (<c>model.layers.N.self_attn.q_proj.weight</c>,
/// …), loadable from a safetensors checkpoint folder.
/// </summary>
public sealed class LlamaForCausalLM : nn.Module
{
    [ComponentName(Name = "embed_tokens")]
    private readonly Parameter _embedTokens;   // [V, D]
    [ComponentName(Name = "layers")]
    private readonly ModuleList<LlamaDecoderLayer> _layers;
    [ComponentName(Name = "norm")]
    private readonly RmsNorm _norm;
    [ComponentName(Name = "lm_head")]
    private readonly Projection? _lmHead;       // null when tied to the embeddings
    private readonly RotaryEmbedding _rotary;
    private readonly LlamaDecoderLayer[] _layerArray;
    private readonly DecodeGraphs _decodeGraphs;

    public LlamaForCausalLM(LlamaConfig config, ScalarType dtype, Device device, int? maxPositions = null, LlamaKernelOptions? kernels = null) : base("LlamaForCausalLM")
    {
        ArgumentNullException.ThrowIfNull(config);
        Config = config;
        DType = dtype;
        Device = device;
        Kernels = (kernels ?? LlamaKernelOptions.Default).On(device);
        _embedTokens = new Parameter(empty(config.VocabSize, config.HiddenSize, dtype: dtype, device: device), requires_grad: false);
        _layerArray = Enumerable.Range(0, config.NumHiddenLayers).Select(i => new LlamaDecoderLayer(config, i, dtype, device, Kernels)).ToArray();
        _layers = new ModuleList<LlamaDecoderLayer>(_layerArray);
        _norm = new RmsNorm(config.HiddenSize, config.RmsNormEps, dtype, device, Kernels.FusedRmsNorm, Kernels.RmsNormKernel, Kernels.NormIntoProjections);
        _lmHead = config.TieWordEmbeddings ? null : new Projection(config.HiddenSize, config.VocabSize, false, dtype, device);
        _rotary = new RotaryEmbedding(config, maxPositions ?? config.MaxPositionEmbeddings, device);
        RegisterComponents();
        _decodeGraphs = new DecodeGraphs(this, Kernels.DecodeGraphs);
    }

    public LlamaConfig Config { get; }
    public ScalarType DType { get; }
    public Device Device { get; }

    /// <summary>Weight layout and fused kernels this model was built with (CUDA-only switches off on other devices).</summary>
    public LlamaKernelOptions Kernels { get; }

    /// <summary>How decode steps run on this model, in words: <c>cuda graphs</c>, <c>off (…why)</c> or <c>segmented (no capture)</c>.</summary>
    public string DecodeGraphStatus => _decodeGraphs.Status;

    /// <summary>
    /// Captures the decode graphs of every batch size up to <paramref name="maxRows"/> ahead of traffic (CUDA graphs
    /// only; otherwise nothing happens), and compiles the decode kernels on CUDA. Returns how many batch sizes were captured.
    /// </summary>
    public int PrepareDecodeGraphs(int maxRows)
    {
        // The decode attention kernel runs between graph segments, so capturing compiles everything but it, and nothing
        // where graphs are off: compile the engine's kernels now, rather than on the first request.
        if (Kernels.DecodeAttentionKernel)
        {
            Engine.Kernels.DecodeAttention.Prepare(DType, Config.NumAttentionHeads, Config.NumKeyValueHeads, Config.HeadDim, Device);
        }
        if (Kernels.RmsNormKernel)
        {
            Engine.Kernels.RmsNormKernel.Prepare(DType, Config.HiddenSize, Device);
        }
        return _decodeGraphs.Prepare(maxRows);
    }

    /// <summary>How decode attention runs on this model, in words: <c>kernel</c>, or <c>kv copies + sdpa (…why)</c>.</summary>
    public string DecodeAttentionStatus => _layerArray[0].Attention.DecodeKernelUnavailable is { } reason ? $"kv copies + sdpa ({reason})" : "kernel";

    /// <summary>The decoder layers.</summary>
    public IReadOnlyList<LlamaDecoderLayer> Layers => _layerArray;

    /// <summary>The rotary table (DSLA folding undoes RoPE with it).</summary>
    public RotaryEmbedding Rotary => _rotary;

    /// <summary>Embedding matrix [V, D].</summary>
    public Parameter Embeddings => _embedTokens;

    /// <summary>The longest sequence the model accepts (prompt plus generated tokens).</summary>
    public int ContextLength => _rotary.MaxPositions;

    /// <summary>
    /// Tensor names and shapes as Hugging Face names them (the tied model has no <c>lm_head.weight</c>).
    /// </summary>
    public IReadOnlyDictionary<string, Tensor> CheckpointTensors()
    {
        var result = new Dictionary<string, Tensor>(StringComparer.Ordinal);
        foreach (var (name, parameter) in named_parameters())
        {
            var hfName = name switch
            {
                "embed_tokens" => "model.embed_tokens.weight",
                _ when name.StartsWith("lm_head", StringComparison.Ordinal) => name,
                _ => "model." + name,
            };
            result[hfName] = parameter;
        }
        return result;
    }

    /// <summary>Loads a Hugging Face checkpoint folder (config.json + safetensors).</summary>
    /// <exception cref="ModelLoadException">The folder, config or a tensor is missing or malformed.</exception>
    public static LlamaForCausalLM Load(string directory, ScalarType dtype, Device device, int? maxPositions = null, LlamaKernelOptions? kernels = null)
    {
        if (!System.IO.Directory.Exists(directory))
        {
            throw new ModelLoadException($"Model folder not found: '{directory}'.");
        }
        var config = LlamaConfig.Load(Path.Combine(directory, "config.json"));
        var model = new LlamaForCausalLM(config, dtype, device, maxPositions, kernels);
        try
        {
            using var reader = CheckpointReader.Open(directory);
            using (no_grad())
            {
                foreach (var (name, target) in model.CheckpointTensors())
                {
                    using var loaded = reader.Read(name, target.shape, dtype, device);
                    target.copy_(loaded);
                }
            }
        }
        catch
        {
            model.Dispose();
            throw;
        }
        return model;
    }

    /// <summary>Fills every weight from a seeded normal distribution (benchmarks of speed, not quality).</summary>
    public void InitializeRandom(long seed, double std = 0.02)
    {
        // TorchSharp creates CPU generators whatever device it is given, and CUDA kernels reject those: seed the
        // device's default generator instead.
        Generator? generator = null;
        if (Device.type == TorchSharp.DeviceType.CPU)
        {
            generator = new Generator((ulong)seed, Device);
        }
        else
        {
            manual_seed(seed);
            if (Device.type == TorchSharp.DeviceType.CUDA)
            {
                cuda.manual_seed(seed);
            }
        }
        using var owned = generator;
        using (no_grad())
        {
            foreach (var (name, parameter) in named_parameters())
            {
                if (name.EndsWith("layernorm.weight", StringComparison.Ordinal) || name == "norm.weight")
                {
                    parameter.fill_(1.0);
                }
                else
                {
                    parameter.normal_(0, std, generator);
                }
            }
        }
    }

    /// <summary>
    /// Runs the model. ids [B, T] (int64); with caches, row b continues sequence caches[b] (its tokens sit at
    /// positions caches[b].Length …); without, every row starts at position 0 and nothing is remembered.
    /// Returns logits [B, T, V], or [B, 1, V] for the last position only.
    /// </summary>
    public Tensor Forward(Tensor ids, IReadOnlyList<SequenceCache>? caches = null, IReadOnlyList<bool>? dslaLayers = null, bool lastPositionOnly = false)
    {
        ArgumentNullException.ThrowIfNull(ids);
        if (_decodeGraphs.Enabled && ids.shape is [var rows, var tokens] && _decodeGraphs.Handles(tokens, rows, caches, dslaLayers))
        {
            return _decodeGraphs.Forward(ids, caches!);
        }
        using var scope = NewDisposeScope();
        var hidden = Hidden(ids, caches, dslaLayers);
        if (lastPositionOnly)
        {
            hidden = hidden.narrow(1, hidden.shape[1] - 1, 1);
        }
        return Logits(hidden).MoveToOuterDisposeScope();
    }

    /// <summary>The final hidden states [B, T, D] (after the last norm is not applied).</summary>
    public Tensor Hidden(Tensor ids, IReadOnlyList<SequenceCache>? caches = null, IReadOnlyList<bool>? dslaLayers = null)
    {
        using var scope = NewDisposeScope();
        using var context = CreateContext(ids, caches, dslaLayers);
        // The residual stream is this method's own tensor: layers may update it in place.
        var hidden = Embed(ids);
        foreach (var layer in _layerArray)
        {
            hidden = layer.Forward(hidden, context, inputIsScratch: true);
        }
        if (caches is not null)
        {
            foreach (var cache in caches)
            {
                cache.Advance(context.TokenCount);
            }
        }
        return hidden.MoveToOuterDisposeScope();
    }

    /// <summary>Token embeddings [B, T, D] for ids [B, T].</summary>
    public Tensor Embed(Tensor ids)
    {
        using var scope = NewDisposeScope();
        return _embedTokens.index_select(0, ids.flatten()).view(ids.shape[0], ids.shape[1], -1).MoveToOuterDisposeScope();
    }

    /// <summary>Logits [B, T, V] from final hidden states [B, T, D] (applies the final norm).</summary>
    public Tensor Logits(Tensor hidden)
    {
        using var scope = NewDisposeScope();
        var weight = _lmHead?.Weight ?? _embedTokens;
        if (DecodeProducts.Product(Kernels.DecodeGemvKernel, hidden, weight, _lmHead?.Bias, _norm) is { } fused)
        {
            return fused.MoveToOuterDisposeScope();
        }
        var normed = _norm.forward(hidden);
        var logits = DecodeProducts.Product(Kernels.DecodeGemvKernel, normed, weight, _lmHead?.Bias)
            ?? (_lmHead is null ? nn.functional.linear(normed, _embedTokens) : _lmHead.forward(normed));
        return logits.MoveToOuterDisposeScope();
    }

    /// <summary>Builds the per-pass context: positions, rotary tables, mix. Validates the context length.</summary>
    public ForwardContext CreateContext(Tensor ids, IReadOnlyList<SequenceCache>? caches, IReadOnlyList<bool>? dslaLayers)
    {
        var (b, t) = ((int)ids.shape[0], (int)ids.shape[1]);
        if (caches is not null && caches.Count != b)
        {
            throw new ArgumentException($"{caches.Count} caches for a batch of {b} rows.", nameof(caches));
        }
        var starts = caches?.Select(c => c.Length).ToArray() ?? new int[b];
        var longest = starts.Max() + t;
        if (longest > ContextLength)
        {
            throw new ContextLengthException(longest, ContextLength);
        }
        using var scope = NewDisposeScope();
        var positions = (tensor(starts.Select(s => (long)s).ToArray(), device: Device).unsqueeze(1) + arange(t, device: Device).unsqueeze(0));
        if (!Kernels.FuseProjections)
        {
            var (cos, sin) = _rotary.At(positions, DType);
            return new ForwardContext(caches, starts, t, cos.DetachFromDisposeScope(), sin.DetachFromDisposeScope(), dslaLayers);
        }
        var (c, s, signed) = _rotary.AtWithSigned(positions, DType);
        return new ForwardContext(caches, starts, t, c.DetachFromDisposeScope(), s.DetachFromDisposeScope(), dslaLayers, signed.DetachFromDisposeScope());
    }

    /// <summary>Device bytes of all weights.</summary>
    public long WeightBytes => parameters().Sum(p => p.NumberOfElements * p.ElementSize);

    /// <summary>
    /// Weight bytes one decode step must read: everything but the embedding table, of which it gathers only the rows
    /// of its tokens (a tied table is read whole, as the output projection).
    /// </summary>
    public long DecodeWeightReadBytes => WeightBytes - (_lmHead is null ? 0 : _embedTokens.NumberOfElements * _embedTokens.ElementSize);

    /// <inheritdoc/>
    protected override void Dispose(bool disposing)
    {
        if (disposing)
        {
            _decodeGraphs.Dispose();
            _rotary.Dispose();
        }
        base.Dispose(disposing);
    }
}

/// <summary>A sequence would exceed the model's context.</summary>
public sealed class ContextLengthException : Exception
{
    public ContextLengthException(int requested, int limit)
        : base($"The sequence needs {requested} positions but the model's context is {limit} tokens.")
    {
        Requested = requested;
        Limit = limit;
    }

    public ContextLengthException() { }
    public ContextLengthException(string message) : base(message) { }
    public ContextLengthException(string message, Exception inner) : base(message, inner) { }

    public int Requested { get; }
    public int Limit { get; }
}

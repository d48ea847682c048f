using DslaMesh.Engine.Inference;
using DslaMesh.Engine.Kernels;
using TorchSharp.Utils;
using static TorchSharp.torch;

namespace DslaMesh.Engine.Models;

/// <summary>
/// Llama softmax self-attention with RoPE and grouped-query attention. GQA never widens the KV heads: the query heads
/// of a group are folded into the query length so SDPA reads each cached key/value once.
/// </summary>
/// <remarks>
/// By default Q, K and V share one weight (<see cref="FusedLinear"/>): one matrix product, RoPE on Q and K together in
/// three kernels, and rows of a batch whose caches share a <see cref="KvBatch"/> append and attend in one call each.
/// Nothing in the forward pass reads device data on the host.
/// </remarks>
public sealed class LlamaAttention : nn.Module, ITokenMixer
{
    [ComponentName(Name = "q_proj")]
    private readonly Projection _q;
    [ComponentName(Name = "k_proj")]
    private readonly Projection _k;
    [ComponentName(Name = "v_proj")]
    private readonly Projection _v;
    [ComponentName(Name = "o_proj")]
    private readonly Projection _o;
    private readonly int _heads;
    private readonly int _kvHeads;
    private readonly int _headDim;
    private readonly FusedLinear? _qkv;
    private readonly long _hidden;
    private readonly string? _decodeKernelUnavailable;
    private readonly bool _gemvKernel;

    public LlamaAttention(LlamaConfig config, ScalarType dtype, Device device, LlamaKernelOptions? kernels = null) : base("LlamaAttention")
    {
        ArgumentNullException.ThrowIfNull(config);
        ArgumentNullException.ThrowIfNull(device);
        kernels = (kernels ?? LlamaKernelOptions.Default).On(device);
        var fuseProjections = kernels.FuseProjections;
        _gemvKernel = kernels.DecodeGemvKernel;
        _heads = config.NumAttentionHeads;
        _kvHeads = config.NumKeyValueHeads;
        _headDim = config.HeadDim;
        // Whether the kernel serves this layer depends only on its dtype, device and shapes: decide once, not per step.
        _decodeKernelUnavailable = kernels.DecodeAttentionKernel
            ? DecodeAttention.Unsupported(dtype, device.type, _heads, _kvHeads, _headDim)
            : device.type == TorchSharp.DeviceType.CUDA ? "kernel off" : "not a CUDA tensor";
        _hidden = config.HiddenSize;
        if (fuseProjections)
        {
            _qkv = new FusedLinear(config.HiddenSize, [_heads * _headDim, _kvHeads * _headDim, _kvHeads * _headDim], config.AttentionBias, dtype, device);
            (_q, _k, _v) = (_qkv.Parts[0], _qkv.Parts[1], _qkv.Parts[2]);
        }
        else
        {
            _q = new Projection(config.HiddenSize, _heads * _headDim, config.AttentionBias, dtype, device);
            _k = new Projection(config.HiddenSize, _kvHeads * _headDim, config.AttentionBias, dtype, device);
            _v = new Projection(config.HiddenSize, _kvHeads * _headDim, config.AttentionBias, dtype, device);
        }
        _o = new Projection(_heads * _headDim, config.HiddenSize, config.AttentionBias, dtype, device);
        RegisterComponents();
    }

    /// <summary>Why decode steps of this layer do not use <see cref="DecodeAttention"/>, or null when they do.</summary>
    public string? DecodeKernelUnavailable => _decodeKernelUnavailable;

    /// <summary>Whether Q, K and V run as one product in this pass.</summary>
    public bool UsesFusedProjections => _qkv is not null && _qkv.IsIntact();

    public Projection QueryProjection => _q;
    public Projection KeyProjection => _k;
    public Projection ValueProjection => _v;
    public Projection OutputProjection => _o;
    public int Heads => _heads;
    public int KvHeads => _kvHeads;
    public int HeadDim => _headDim;

    /// <summary>
    /// q [B, H, T, hd], k and v [B, Hkv, T, hd] for x [B, T, D], with RoPE applied to q and k (what the KV cache holds).
    /// </summary>
    public (Tensor Q, Tensor K, Tensor V) Project(Tensor x, ForwardContext context)
    {
        ArgumentNullException.ThrowIfNull(x);
        ArgumentNullException.ThrowIfNull(context);
        using var scope = NewDisposeScope();
        var xShape = x.shape;
        var (b, t) = (xShape[0], xShape[1]);
        if (context.SinSigned is not null && UsesFusedProjections)
        {
            var (fq, fk, fv) = ProjectFused(x, b, t, context.CosTokenMajor, context.SinSignedTokenMajor!);
            return (fq.MoveToOuterDisposeScope(), fk.MoveToOuterDisposeScope(), fv.MoveToOuterDisposeScope());
        }
        var (q, k, v) = ProjectUnrotated(x);
        q = RotaryEmbedding.Apply(q, context.Cos, context.Sin);
        k = RotaryEmbedding.Apply(k, context.Cos, context.Sin);
        return (q.MoveToOuterDisposeScope(), k.MoveToOuterDisposeScope(), v.MoveToOuterDisposeScope());
    }

    /// <summary>
    /// q [B, H, T, hd], k and v [B, Hkv, T, hd] for x [B, T, D] before RoPE: what the decode kernel takes (it rotates q
    /// and k itself). Views of one product when the projections are fused. With <paramref name="norm"/>, x is the norm's
    /// input: the projections of norm(x), the norm inside the GEMV launch where it fuses.
    /// </summary>
    internal (Tensor Q, Tensor K, Tensor V) ProjectUnrotated(Tensor x, RmsNorm? norm = null)
    {
        using var scope = NewDisposeScope();
        var (b, t) = (x.shape[0], x.shape[1]);
        Tensor q, k, v;
        if (UsesFusedProjections)
        {
            // [B, T, H + 2·Hkv, hd]. cuBLAS beats the GEMV kernel on this shape (27.4 vs 29.8 µs, H200), but by less than
            // the norm's own launch costs (~4 µs in a graph): with the norm fused in, the GEMV kernel takes it.
            var product = norm is null ? null : DecodeProducts.Product(_gemvKernel, x, _qkv!.Weight, _qkv.Bias, norm);
            var qkv = (product ?? _qkv!.Forward(norm?.forward(x) ?? x)).view(b, t, _heads + (2 * _kvHeads), _headDim);
            q = qkv.narrow(2, 0, _heads).transpose(1, 2);
            k = qkv.narrow(2, _heads, _kvHeads).transpose(1, 2);
            v = qkv.narrow(2, _heads + _kvHeads, _kvHeads).transpose(1, 2);
        }
        else
        {
            x = norm?.forward(x) ?? x;
            q = _q.forward(x).view(b, t, _heads, _headDim).transpose(1, 2);
            k = _k.forward(x).view(b, t, _kvHeads, _headDim).transpose(1, 2);
            v = _v.forward(x).view(b, t, _kvHeads, _headDim).transpose(1, 2);
        }
        return (q.MoveToOuterDisposeScope(), k.MoveToOuterDisposeScope(), v.MoveToOuterDisposeScope());
    }

    /// <summary>
    /// Whether decode steps (one token per row, with caches) run the attention core in <see cref="DecodeAttention"/>,
    /// which applies RoPE itself: such steps project with <see cref="ProjectUnrotated"/>.
    /// </summary>
    internal bool DecodeRotatesInKernel => _decodeKernelUnavailable is null;

    private bool DecodeKernelServes(ForwardContext context) => context.TokenCount == 1 && context.Caches is not null && DecodeRotatesInKernel;

    /// <summary>
    /// The fused projection (requires <see cref="UsesFusedProjections"/>): q [B, H, T, hd], k and v [B, Hkv, T, hd] for
    /// x [B, T, D], RoPE from cos and signed sin laid out token-major [B, T, 1, hd]. Returns views of one new tensor.
    /// </summary>
    internal (Tensor Q, Tensor K, Tensor V) ProjectFused(Tensor x, long b, long t, Tensor cosTokenMajor, Tensor sinSignedTokenMajor)
    {
        using var scope = NewDisposeScope();
        // [B, T, H + 2·Hkv, hd]; roll the whole (contiguous) tensor once: rolling a view would copy it first.
        var qkv = _qkv!.Forward(x).view(b, t, _heads + (2 * _kvHeads), _headDim);
        var rolled = qkv.roll(_headDim / 2, -1);
        var qkCount = _heads + _kvHeads;
        var rotated = RotaryEmbedding.ApplyRolled(qkv.narrow(2, 0, qkCount), rolled.narrow(2, 0, qkCount), cosTokenMajor, sinSignedTokenMajor);
        var q = rotated.narrow(2, 0, _heads).transpose(1, 2);
        var k = rotated.narrow(2, _heads, _kvHeads).transpose(1, 2);
        var v = qkv.narrow(2, qkCount, _kvHeads).transpose(1, 2);
        return (q.MoveToOuterDisposeScope(), k.MoveToOuterDisposeScope(), v.MoveToOuterDisposeScope());
    }

    /// <inheritdoc/>
    public Tensor Forward(Tensor x, ForwardContext context, int layer)
    {
        using var scope = NewDisposeScope();
        return _o.forward(Mix(x, context, layer)).MoveToOuterDisposeScope();
    }

    /// <summary>
    /// residual + Forward(x), written into <paramref name="residual"/> [B, T, D] by the output projection itself (one
    /// GEMM with β = 1) when gradients are off, the projection has no bias and the residual is contiguous; otherwise a
    /// new tensor. Returns the result.
    /// </summary>
    public Tensor AddTo(Tensor residual, Tensor x, ForwardContext context, int layer)
    {
        ArgumentNullException.ThrowIfNull(residual);
        using var scope = NewDisposeScope();
        if (!AddsInPlace || is_grad_enabled() || !residual.is_contiguous())
        {
            return (residual + Forward(x, context, layer)).MoveToOuterDisposeScope();
        }
        AddOutputTo(residual, Mix(x, context, layer));
        return residual;
    }

    /// <summary>Whether the output projection can add into a residual in place (fused weights, no bias).</summary>
    internal bool AddsInPlace => _qkv is not null && _o.Bias is null;

    /// <summary>residual [B, T, D] += o_proj(merged [B, T, H·hd]), as one GEMM with β = 1 (requires <see cref="AddsInPlace"/>).</summary>
    internal void AddOutputTo(Tensor residual, Tensor merged)
    {
        using var scope = NewDisposeScope();
        var rows = residual.view(-1, _hidden);
        var input = merged.reshape(-1, _heads * _headDim);
        if (!DecodeProducts.AddInto(_gemvKernel, rows, input, _o.Weight))
        {
            rows.addmm_(input, _o.WeightTransposed);
        }
    }

    /// <summary>Attention before the output projection: x [B, T, D] → [B, T, H·hd].</summary>
    private Tensor Mix(Tensor x, ForwardContext context, int layer)
    {
        using var scope = NewDisposeScope();
        var (q, k, v) = DecodeKernelServes(context) ? ProjectUnrotated(x) : Project(x, context);
        return MixProjected(q, k, v, context, layer).MoveToOuterDisposeScope();
    }

    /// <summary>
    /// Attention of projected q [B, H, T, hd], k, v [B, Hkv, T, hd] over each row's cache (appending k and v to it):
    /// [B, T, H·hd], before the output projection. q and k come rotated, except in steps the decode kernel serves
    /// (<see cref="DecodeRotatesInKernel"/>, one token per row with caches), where they come unrotated and the kernel
    /// applies RoPE. <paramref name="into"/> [B, T, H·hd], when given, may receive the result (the decode kernel writes
    /// there directly); the caller compares the returned tensor with it.
    /// </summary>
    internal Tensor MixProjected(Tensor q, Tensor k, Tensor v, ForwardContext context, int layer, Tensor? into = null)
    {
        using var scope = NewDisposeScope();
        var (b, t) = ((long)context.StartPositions.Length, (long)context.TokenCount);
        if (DecodeKernelServes(context))
        {
            var target = into ?? empty([b, 1, _heads * _headDim], dtype: q.dtype, device: q.device);
            DecodeStep(q, k, v, context, layer, target.view(b, _heads, _headDim));
            return into is null ? target.MoveToOuterDisposeScope() : into;
        }
        Tensor output;
        if (context.Caches is null)
        {
            output = Attend(q, k, v, 0);
        }
        else if (KvBatch.TryAppend(context.Caches, layer, context, k, v, out var batchKeys, out var batchValues))
        {
            output = Attend(q, batchKeys, batchValues, context.StartPositions[0]);
        }
        else
        {
            var rows = new Tensor[b];
            for (var row = 0; row < b; row++)
            {
                var cache = context.Caches[row];
                if (cache[layer] is not KvState state)
                {
                    if (cache[layer] is not null)
                    {
                        throw new InvalidOperationException($"Layer {layer} of this sequence holds DSLA state; softmax attention cannot resume from it.");
                    }
                    state = new KvState(_kvHeads, _headDim, Math.Max(cache.ExpectedLength, context.StartPositions[row] + (int)t), k.dtype, k.device);
                    cache[layer] = state;
                }
                var (keys, values) = b == 1 ? state.Append(k, v) : state.Append(k.narrow(0, row, 1), v.narrow(0, row, 1));
                rows[row] = Attend(b == 1 ? q : q.narrow(0, row, 1), keys, values, context.StartPositions[row]);
            }
            output = b == 1 ? rows[0] : cat(rows, 0);
        }
        // [B, H, T, hd] → [B, T, H·hd]
        return output.transpose(1, 2).reshape(b, t, _heads * _headDim).MoveToOuterDisposeScope();
    }

    /// <summary>
    /// One decode step's attention core through <see cref="DecodeAttention"/>: unrotated q [B, H, 1, hd], k, v
    /// [B, Hkv, 1, hd] → output [B, H, hd], rotating q and k by the context's tables and appending k and v to each row's
    /// cache. Rows that share a <see cref="KvBatch"/> run as one launch, other rows one launch each.
    /// </summary>
    private void DecodeStep(Tensor q, Tensor k, Tensor v, ForwardContext context, int layer, Tensor output)
    {
        var caches = context.Caches!;
        var (q3, k3, v3) = (q.select(2, 0), k.select(2, 0), v.select(2, 0));
        // [B, 1, 1, hd] → [B, hd]
        var (cos, sin) = (context.Cos.reshape(caches.Count, _headDim), context.Sin.reshape(caches.Count, _headDim));
        if (KvBatch.TryRows(caches, layer, context, k, out var batchKeys, out var batchValues))
        {
            DecodeAttention.Run(q3, k3, v3, batchKeys, batchValues, context.StartPositions[0], output, cos, sin);
            KvBatch.Advance(caches, layer, 1);
            return;
        }
        for (var row = 0; row < caches.Count; row++)
        {
            var cache = caches[row];
            var state = cache[layer] switch
            {
                KvState existing => existing,
                null => (KvState)(cache[layer] = new KvState(_kvHeads, _headDim, Math.Max(cache.ExpectedLength, context.StartPositions[row] + 1), k.dtype, k.device)),
                _ => throw new InvalidOperationException($"Layer {layer} of this sequence holds DSLA state; softmax attention cannot resume from it."),
            };
            var (keys, values) = state.Reserve(state.Length + 1);
            var single = caches.Count == 1;
            DecodeAttention.Run(single ? q3 : q3.narrow(0, row, 1), single ? k3 : k3.narrow(0, row, 1), single ? v3 : v3.narrow(0, row, 1),
                keys, values, state.Length, single ? output : output.narrow(0, row, 1), single ? cos : cos.narrow(0, row, 1), single ? sin : sin.narrow(0, row, 1));
            state.Advance(1);
        }
    }

    /// <summary>
    /// Causal attention of q [B, H, T, hd] over keys/values [B, Hkv, L, hd], where query i sits at position
    /// <paramref name="start"/> + i and key j at position j (L = start + T).
    /// </summary>
    public Tensor Attend(Tensor q, Tensor keys, Tensor values, int start)
    {
        using var scope = NewDisposeScope();
        var qShape = q.shape;
        var (b, t, l) = (qShape[0], qShape[2], keys.shape[2]);
        var group = _heads / _kvHeads;
        // Fold the query heads of each KV group into the query axis: [B, Hkv, group·T, hd].
        var grouped = group == 1 ? q : q.reshape(b, _kvHeads, group * t, _headDim);
        Tensor result;
        if (t == 1)
        {
            result = nn.functional.scaled_dot_product_attention(grouped, keys, values);
        }
        else if (group == 1 && start == 0 && l == t)
        {
            result = nn.functional.scaled_dot_product_attention(grouped, keys, values, is_casual: true);
        }
        else
        {
            // Row (g, i) may see key j when j ≤ start + i. [group·T, L] bool, true = attend.
            var queryPositions = arange(start, start + t, device: q.device).repeat(group).unsqueeze(1);
            var mask = arange(l, device: q.device).unsqueeze(0) <= queryPositions;
            result = nn.functional.scaled_dot_product_attention(grouped, keys, values, attn_mask: mask);
        }
        return (group == 1 ? result : result.reshape(b, _heads, t, _headDim)).MoveToOuterDisposeScope();
    }

    /// <inheritdoc/>
    protected override void Dispose(bool disposing)
    {
        if (disposing)
        {
            _qkv?.Dispose();
        }
        base.Dispose(disposing);
    }

    /// <summary>
    /// Entropy of the last query token's attention distribution, averaged over heads and batch: the paper's layer
    /// sensitivity (low entropy converts first). x [B, T, D].
    /// </summary>
    public double LastTokenEntropy(Tensor x, ForwardContext context)
    {
        using var scope = NewDisposeScope();
        var (q, k, _) = Project(x, context);
        var (b, t) = (q.shape[0], q.shape[2]);
        var lastQuery = q.narrow(2, t - 1, 1).to(ScalarType.Float32);                        // [B, H, 1, hd]
        var keys = k.to(ScalarType.Float32).repeat_interleave(_heads / _kvHeads, dim: 1);   // [B, H, T, hd]
        var scores = matmul(lastQuery, keys.transpose(2, 3)) / Math.Sqrt(_headDim);          // [B, H, 1, T]
        var p = scores.softmax(-1);
        var entropy = -(p * p.clamp_min(1e-12).log()).sum(-1);                               // [B, H, 1]
        _ = b;
        return entropy.mean().item<float>();
    }
}

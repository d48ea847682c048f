using static TorchSharp.torch;

namespace DslaMesh.Engine.Models;

/// <summary>
/// Rotary position embeddings with HF's rotate-half layout, default or llama3 frequency scaling. Keeps a cos/sin table
/// for every position up to the model's context, computed in fp64 → fp32 once.
/// </summary>
public sealed class RotaryEmbedding : IDisposable
{
    private static readonly TorchSharp.Scalar One = 1.0;
    private readonly Tensor _cos;   // [P, hd] fp32
    private readonly Tensor _sin;   // [P, hd] fp32
    private readonly Tensor _sinSigned;   // [P, hd] fp32: sin with its first half negated (see ApplyRolled)

    public RotaryEmbedding(LlamaConfig config, int maxPositions, Device device)
    {
        var invFreq = InverseFrequencies(config.Rope, config.HeadDim);
        var positions = Enumerable.Range(0, maxPositions).Select(p => (double)p).ToArray();
        using var scope = NewDisposeScope();
        var freqs = outer(tensor(positions, dtype: ScalarType.Float64), tensor(invFreq, dtype: ScalarType.Float64)).to(ScalarType.Float32);
        var emb = cat([freqs, freqs], -1);
        _cos = emb.cos().to(device).DetachFromDisposeScope();
        _sin = emb.sin().to(device).DetachFromDisposeScope();
        var half = config.HeadDim / 2;
        var sign = cat([full(half, -1.0f), ones(config.HeadDim - half)]);
        _sinSigned = (emb.sin() * sign).to(device).DetachFromDisposeScope();
        MaxPositions = maxPositions;
    }

    /// <summary>Positions the table covers.</summary>
    public int MaxPositions { get; }

    /// <summary>HF's inverse frequencies for a head dimension, with llama3 smoothing where configured.</summary>
    public static double[] InverseFrequencies(RopeSettings rope, int headDim)
    {
        var inv = Enumerable.Range(0, headDim / 2).Select(i => 1.0 / Math.Pow(rope.Theta, 2.0 * i / headDim)).ToArray();
        if (rope.RopeType != "llama3")
        {
            return inv;
        }
        var lowWavelen = rope.OriginalMaxPositionEmbeddings / rope.LowFreqFactor;
        var highWavelen = rope.OriginalMaxPositionEmbeddings / rope.HighFreqFactor;
        return inv.Select(f =>
        {
            var wavelen = 2 * Math.PI / f;
            if (wavelen > lowWavelen)
            {
                return f / rope.Factor;
            }
            if (wavelen < highWavelen)
            {
                return f;
            }
            var smooth = ((rope.OriginalMaxPositionEmbeddings / wavelen) - rope.LowFreqFactor) / (rope.HighFreqFactor - rope.LowFreqFactor);
            return ((1 - smooth) * f / rope.Factor) + (smooth * f);
        }).ToArray();
    }

    /// <summary>cos and sin for positions [B, T] (int64), as [B, 1, T, hd] in <paramref name="dtype"/>.</summary>
    public (Tensor Cos, Tensor Sin) At(Tensor positions, ScalarType dtype)
    {
        using var scope = NewDisposeScope();
        var flat = positions.flatten();
        var shape = new long[] { positions.shape[0], 1, positions.shape[1], _cos.shape[1] };
        var cosAt = _cos.index_select(0, flat).view(shape).to(dtype);
        var sinAt = _sin.index_select(0, flat).view(shape).to(dtype);
        return (cosAt.MoveToOuterDisposeScope(), sinAt.MoveToOuterDisposeScope());
    }

    /// <summary>
    /// cos, sin and signed sin (first half negated) for positions [B, T] (int64), as [B, 1, T, hd] in <paramref name="dtype"/>.
    /// </summary>
    public (Tensor Cos, Tensor Sin, Tensor SinSigned) AtWithSigned(Tensor positions, ScalarType dtype)
    {
        using var scope = NewDisposeScope();
        var (cos, sin) = At(positions, dtype);
        var shape = new long[] { positions.shape[0], 1, positions.shape[1], _cos.shape[1] };
        var signed = _sinSigned.index_select(0, positions.flatten()).view(shape).to(dtype);
        return (cos.MoveToOuterDisposeScope(), sin.MoveToOuterDisposeScope(), signed.MoveToOuterDisposeScope());
    }

    /// <summary>
    /// RoPE in three kernels: x·cos + roll(x, hd/2)·sinSigned equals x·cos + rotate_half(x)·sin, because roll swaps the
    /// halves and sinSigned carries rotate_half's minus sign. <paramref name="rolled"/> is x rolled by hd/2 along the
    /// last dimension (callers roll a larger contiguous tensor once and pass a view of it). Any layout whose last
    /// dimension is hd, with cos/sinSigned broadcastable to it.
    /// </summary>
    public static Tensor ApplyRolled(Tensor x, Tensor rolled, Tensor cos, Tensor sinSigned)
    {
        using var scope = NewDisposeScope();
        return addcmul(x * cos, rolled, sinSigned, One).MoveToOuterDisposeScope();
    }

    /// <summary>Rotates x [B, H, T, hd] by the given cos/sin [B, 1, T, hd].</summary>
    public static Tensor Apply(Tensor x, Tensor cos, Tensor sin)
    {
        using var scope = NewDisposeScope();
        return ((x * cos) + (RotateHalf(x) * sin)).MoveToOuterDisposeScope();
    }

    /// <summary>Undoes <see cref="Apply"/>: a rotation's inverse is the rotation by −θ.</summary>
    public static Tensor Invert(Tensor x, Tensor cos, Tensor sin)
    {
        using var scope = NewDisposeScope();
        return ((x * cos) - (RotateHalf(x) * sin)).MoveToOuterDisposeScope();
    }

    private static Tensor RotateHalf(Tensor x)
    {
        var half = x.shape[^1] / 2;
        return cat([-x[TensorIndex.Ellipsis, TensorIndex.Slice(half)], x[TensorIndex.Ellipsis, TensorIndex.Slice(0, half)]], -1);
    }

    /// <inheritdoc/>
    public void Dispose()
    {
        _cos.Dispose();
        _sin.Dispose();
        _sinSigned.Dispose();
    }
}

using DslaMesh.Engine.Inference;
using static TorchSharp.torch;

namespace DslaMesh.Engine.Models;

/// <summary>
/// What every layer of one forward pass shares: the batch's caches, positions, rotary tables, and which layers run as
/// DSLA. Built by <see cref="LlamaForCausalLM"/>; owned (and disposed) by it.
/// </summary>
public sealed class ForwardContext : IDisposable
{
    private Tensor? _cosTokenMajor;
    private Tensor? _sinSignedTokenMajor;

    public ForwardContext(IReadOnlyList<SequenceCache>? caches, int[] startPositions, int tokenCount, Tensor cos, Tensor sin, IReadOnlyList<bool>? dslaLayers, Tensor? sinSigned = null)
    {
        SinSigned = sinSigned;
        Caches = caches;
        StartPositions = startPositions;
        TokenCount = tokenCount;
        Cos = cos;
        Sin = sin;
        DslaLayers = dslaLayers;
    }

    /// <summary>One cache per batch row, or null for a cache-free pass (training, evaluation).</summary>
    public IReadOnlyList<SequenceCache>? Caches { get; }

    /// <summary>Position of each row's first token in this pass.</summary>
    public int[] StartPositions { get; }

    /// <summary>Tokens per row in this pass (T).</summary>
    public int TokenCount { get; }

    /// <summary>RoPE cos for every (row, token): [B, 1, T, hd].</summary>
    public Tensor Cos { get; }

    /// <summary>RoPE sin for every (row, token): [B, 1, T, hd].</summary>
    public Tensor Sin { get; }

    /// <summary>RoPE sin with its first half negated, [B, 1, T, hd], when the model built it (see <see cref="RotaryEmbedding.ApplyRolled"/>).</summary>
    public Tensor? SinSigned { get; }

    /// <summary>cos as [B, T, 1, hd] (a view), for projections laid out token-major [B, T, heads, hd].</summary>
    public Tensor CosTokenMajor => _cosTokenMajor ??= Cos.transpose(1, 2).DetachFromDisposeScope();

    /// <summary>Signed sin as [B, T, 1, hd] (a view), or null.</summary>
    public Tensor? SinSignedTokenMajor => SinSigned is null ? null : _sinSignedTokenMajor ??= SinSigned.transpose(1, 2).DetachFromDisposeScope();

    /// <summary>Per layer: run its DSLA replacement instead of softmax attention. Null: all softmax.</summary>
    public IReadOnlyList<bool>? DslaLayers { get; }

    /// <summary>Whether every row starts at the same position (so one batched attention call serves them all).</summary>
    public bool UniformStart => StartPositions.All(p => p == StartPositions[0]);

    /// <summary>Whether layer <paramref name="layer"/> runs as DSLA in this pass.</summary>
    public bool UsesDsla(int layer) => DslaLayers is { } mix && layer < mix.Count && mix[layer];

    /// <inheritdoc/>
    public void Dispose()
    {
        _cosTokenMajor?.Dispose();
        _sinSignedTokenMajor?.Dispose();
        Cos.Dispose();
        Sin.Dispose();
        SinSigned?.Dispose();
    }
}

/// <summary>
/// A token mixer: the attention slot of a decoder layer. Softmax attention and DSLA both implement it, so a layer can
/// switch between them per forward pass.
/// </summary>
public interface ITokenMixer
{
    /// <summary>x [B, T, D] (after the input norm) → [B, T, D]; reads and updates layer <paramref name="layer"/> of each cache.</summary>
    Tensor Forward(Tensor x, ForwardContext context, int layer);
}


using DslaMesh.Engine.Models;
using static TorchSharp.torch;

namespace DslaMesh.Engine.Distillation;

/// <summary>
/// Runs a (possibly hybrid) model part of the way, to capture what one layer's attention block sees and what the
/// teacher's attention makes of it. This is where chained distillation gets its inputs, so it is explicit about
/// indices: the residual stream that enters layer k is the output of layer k − 1 (the embeddings for k = 0), computed
/// with the given mix (layers already converted run as DSLA); the attention block of layer k reads
/// x_k = input_layernorm_k(h_k), and its softmax output (o_proj applied, residual not added) is the distillation target.
/// The public reference code compares HF <c>hidden_states[k]</c>, which is the input of layer k, so a converted layer's
/// own output never enters its loss (dsla-paper.md §6.2.3); here the target is the attention block's output itself.
/// </summary>
public static class HybridForward
{
    /// <summary>
    /// The attention input x_k [B, T, D] of layer <paramref name="layer"/> for token ids [B, T] (positions 0 … T − 1, no
    /// cache) with layers 0 … k − 1 run per <paramref name="mix"/> (null: all softmax), and, when
    /// <paramref name="withTarget"/>, the teacher softmax attention output [B, T, D] on it. Runs under no_grad; the
    /// tensors carry no graph.
    /// </summary>
    public static LayerCapture CaptureLayer(LlamaForCausalLM model, Tensor ids, int layer, IReadOnlyList<bool>? mix, bool withTarget = true)
    {
        ArgumentNullException.ThrowIfNull(model);
        ArgumentNullException.ThrowIfNull(ids);
        ArgumentOutOfRangeException.ThrowIfNegative(layer);
        ArgumentOutOfRangeException.ThrowIfGreaterThanOrEqual(layer, model.Layers.Count);
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        using var context = model.CreateContext(ids, null, mix);
        var hidden = ResidualBefore(model, ids, layer, context);
        var decoder = model.Layers[layer];
        var input = decoder.InputNorm.forward(hidden);
        var target = withTarget ? decoder.Attention.Forward(input, context, layer) : null;
        return new LayerCapture(input.MoveToOuterDisposeScope(), target?.MoveToOuterDisposeScope());
    }

    /// <summary>
    /// The residual stream h_k [B, T, D] entering layer <paramref name="layer"/>: the embeddings passed through layers
    /// 0 … k − 1 of <paramref name="context"/>'s mix. Differentiable when called with gradients on.
    /// </summary>
    public static Tensor ResidualBefore(LlamaForCausalLM model, Tensor ids, int layer, ForwardContext context)
    {
        ArgumentNullException.ThrowIfNull(model);
        using var scope = NewDisposeScope();
        var hidden = model.Embed(ids);
        for (var i = 0; i < layer; i++)
        {
            hidden = model.Layers[i].Forward(hidden, context);
        }
        return hidden.MoveToOuterDisposeScope();
    }
}

/// <summary>What <see cref="HybridForward.CaptureLayer"/> captured for one layer. Disposing frees both tensors.</summary>
/// <param name="Input">x_k = input_layernorm_k(h_k), [B, T, D].</param>
/// <param name="Target">The teacher softmax attention output on <paramref name="Input"/>, [B, T, D], or null.</param>
public sealed record LayerCapture(Tensor Input, Tensor? Target) : IDisposable
{
    /// <inheritdoc/>
    public void Dispose()
    {
        Input.Dispose();
        Target?.Dispose();
    }
}

using TorchSharp.Utils;
using static TorchSharp.torch;

namespace DslaMesh.Engine.Models;

/// <summary>
/// One pre-norm Llama block. The attention slot holds the teacher's softmax attention and, once attached, a DSLA
/// replacement; each forward pass picks one per <see cref="ForwardContext.UsesDsla"/>, so a layer switches in both
/// directions without reloading anything.
/// </summary>
public sealed class LlamaDecoderLayer : nn.Module
{
    [ComponentName(Name = "self_attn")]
    private readonly LlamaAttention _attention;
    [ComponentName(Name = "mlp")]
    private readonly LlamaMlp _mlp;
    [ComponentName(Name = "input_layernorm")]
    private readonly RmsNorm _inputNorm;
    [ComponentName(Name = "post_attention_layernorm")]
    private readonly RmsNorm _postAttentionNorm;

    public LlamaDecoderLayer(LlamaConfig config, int index, ScalarType dtype, Device device, LlamaKernelOptions? kernels = null) : base("LlamaDecoderLayer")
    {
        ArgumentNullException.ThrowIfNull(config);
        kernels = (kernels ?? LlamaKernelOptions.Default).On(device);
        Index = index;
        _attention = new LlamaAttention(config, dtype, device, kernels);
        _mlp = new LlamaMlp(config, dtype, device, kernels.FuseProjections, kernels.DecodeGemvKernel);
        _inputNorm = new RmsNorm(config.HiddenSize, config.RmsNormEps, dtype, device, kernels.FusedRmsNorm, kernels.RmsNormKernel, kernels.NormIntoProjections);
        _postAttentionNorm = new RmsNorm(config.HiddenSize, config.RmsNormEps, dtype, device, kernels.FusedRmsNorm, kernels.RmsNormKernel, kernels.NormIntoProjections);
        RegisterComponents();
    }

    /// <summary>Layer index in the model.</summary>
    public int Index { get; }

    public LlamaAttention Attention => _attention;
    public LlamaMlp Mlp => _mlp;
    public RmsNorm InputNorm => _inputNorm;
    public RmsNorm PostAttentionNorm => _postAttentionNorm;

    /// <summary>The DSLA (or other) replacement for the attention slot, if one is attached.</summary>
    public ITokenMixer? Replacement { get; set; }

    /// <summary>The mixer this pass uses.</summary>
    public ITokenMixer MixerFor(ForwardContext context)
    {
        if (!context.UsesDsla(Index))
        {
            return _attention;
        }
        return Replacement ?? throw new InvalidOperationException($"Layer {Index} has no DSLA weights attached; it cannot run as DSLA.");
    }

    /// <summary>h [B, T, D] → [B, T, D].</summary>
    public Tensor Forward(Tensor hidden, ForwardContext context) => Forward(hidden, context, inputIsScratch: false);

    /// <summary>
    /// h [B, T, D] → [B, T, D]. With <paramref name="inputIsScratch"/> (the caller will not read
    /// <paramref name="hidden"/> again), the softmax attention adds its output into <paramref name="hidden"/> in place,
    /// which may then be the tensor returned.
    /// </summary>
    internal Tensor Forward(Tensor hidden, ForwardContext context, bool inputIsScratch)
    {
        ArgumentNullException.ThrowIfNull(hidden);
        using var scope = NewDisposeScope();
        var mixer = MixerFor(context);
        var normed = _inputNorm.forward(hidden);
        var attended = inputIsScratch && mixer is LlamaAttention attention
            ? attention.AddTo(hidden, normed, context, Index)
            : hidden + mixer.Forward(normed, context, Index);
        // attended is this layer's own tensor (or the caller's scratch), so the MLP may add its output into it in place.
        var result = _mlp.AddTo(attended, attended, _postAttentionNorm);
        return ReferenceEquals(result, hidden) ? result : result.MoveToOuterDisposeScope();
    }
}

using DslaMesh.Engine.Models;
using TorchSharp.Utils;
using static TorchSharp.torch;

namespace DslaMesh.Engine.Dsla;

/// <summary>
/// Single-state gated linear attention, the paper's GLA baseline for the ablation: the same layer as
/// <see cref="DslaAttention"/> with one gate set and no mixing, output = o_proj(o). Its one gate projection gk_proj
/// [Hkv·hd, D] + bias is initialised like DSLA's recency gate (nn.Linear default, bias 0).
/// </summary>
public sealed class GlaAttention : GatedLinearMixer
{
    [ComponentName(Name = "q_proj")]
    private readonly Projection _q;
    [ComponentName(Name = "k_proj")]
    private readonly Projection _k;
    [ComponentName(Name = "v_proj")]
    private readonly Projection _v;
    [ComponentName(Name = "o_proj")]
    private readonly Projection _o;
    [ComponentName(Name = "gk_proj")]
    private readonly Projection _gate;

    /// <summary>Allocates the layer with uninitialised weights (fill them with <see cref="FromTeacher"/> or a checkpoint).</summary>
    public GlaAttention(LlamaConfig config, ScalarType dtype, Device device) : base("GlaAttention", config, 1)
    {
        var d = config.HiddenSize;
        _q = new Projection(d, Heads * HeadDim, config.AttentionBias, dtype, device);
        _k = new Projection(d, KvHeads * HeadDim, config.AttentionBias, dtype, device);
        _v = new Projection(d, KvHeads * HeadDim, config.AttentionBias, dtype, device);
        _o = new Projection(Heads * HeadDim, d, config.AttentionBias, dtype, device);
        _gate = new Projection(d, KvHeads * HeadDim, true, dtype, device);
        RegisterComponents();
    }

    /// <inheritdoc/>
    public override DslaVariant Variant => DslaVariant.Gla;

    /// <summary>The gate projection gk_proj.</summary>
    public Projection Gate => _gate;

    /// <summary>q_proj.</summary>
    public Projection QueryProjection => _q;

    /// <summary>A GLA layer with q/k/v/o copied from the teacher (as <see cref="DslaAttention.FromTeacher"/>) and a seeded random gate.</summary>
    public static GlaAttention FromTeacher(LlamaAttention teacher, LlamaConfig config, long seed)
    {
        ArgumentNullException.ThrowIfNull(teacher);
        var weight = teacher.QueryProjection.Weight;
        var layer = new GlaAttention(config, weight.dtype, weight.device);
        try
        {
            using var generator = Init.CpuGenerator(seed);
            using (no_grad())
            {
                Init.CopyProjection(layer._q, teacher.QueryProjection);
                Init.CopyProjection(layer._k, teacher.KeyProjection);
                Init.CopyProjection(layer._v, teacher.ValueProjection);
                Init.CopyProjection(layer._o, teacher.OutputProjection);
                Init.LinearDefault(layer._gate, generator);
            }
        }
        catch
        {
            layer.Dispose();
            throw;
        }
        return layer;
    }

    /// <inheritdoc/>
    protected override (Tensor Q, Tensor K, Tensor V, Tensor[] LogGates) Features(Tensor x)
    {
        using var scope = NewDisposeScope();
        var q = SplitHeads(_q.forward(x), Heads);                   // [B, H, T, hd]
        var k = SplitHeads(_k.forward(x), KvHeads);                 // [B, Hkv, T, hd]
        var v = SplitHeads(_v.forward(x), KvHeads);                 // [B, Hkv, T, hd]
        var gate = SplitHeads(LogGate(_gate.forward(x)), KvHeads);  // [B, Hkv, T, hd] fp32
        return (q.MoveToOuterDisposeScope(), k.MoveToOuterDisposeScope(), v.MoveToOuterDisposeScope(), [gate.MoveToOuterDisposeScope()]);
    }

    /// <inheritdoc/>
    protected override Tensor Combine(Tensor[] outputs) => outputs[0];

    /// <inheritdoc/>
    protected override Tensor ProjectOutput(Tensor merged) => _o.forward(merged);
}

using DslaMesh.Engine.Models;
using TorchSharp.Modules;
using TorchSharp.Utils;
using static TorchSharp.torch;

namespace DslaMesh.Engine.Dsla;

/// <summary>
/// The paper's dual-state linear attention (dsla-paper.md §1.2), GQA-native: two gated linear-attention states per KV
/// head over the same q, k, v — history (gate projection initialised to the identity) and recency (random gate
/// projection) — mixed by γ = softmax(alpha_list)[0]: output = o_proj(γ·o_hist + (1 − γ)·o_rec). Gates come from the
/// layer input x: logGate = clamp_min(logsigmoid(W x + b) / 16, −50), per KV head and key dimension. No RoPE, no feature
/// map, no normaliser.
/// <para>
/// Parameters (checkpoint names): q_proj [H·hd, D], k_proj [Hkv·hd, D], v_proj [Hkv·hd, D], o_proj [D, H·hd] (bias as
/// the teacher's attention_bias), gk_proj [Hkv·hd, D] + bias, gk_proj2 [Hkv·hd, D] + bias, alpha_list [2] (fp32).
/// </para>
/// </summary>
public sealed class DslaAttention : GatedLinearMixer
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
    private readonly Projection _historyGate;
    [ComponentName(Name = "gk_proj2")]
    private readonly Projection _recencyGate;
    [ComponentName(Name = "alpha_list")]
    private readonly Parameter _alpha;   // [2] fp32 mixing logits

    /// <summary>Allocates the layer with uninitialised weights (fill them with <see cref="FromTeacher"/> or a checkpoint).</summary>
    public DslaAttention(LlamaConfig config, ScalarType dtype, Device device) : base("DslaAttention", config, 2)
    {
        var d = config.HiddenSize;
        _q = new Projection(d, Heads * HeadDim, config.AttentionBias, dtype, device);
        _k = new Projection(d, KvHeads * HeadDim, config.AttentionBias, dtype, device);
        _v = new Projection(d, KvHeads * HeadDim, config.AttentionBias, dtype, device);
        _o = new Projection(Heads * HeadDim, d, config.AttentionBias, dtype, device);
        _historyGate = new Projection(d, KvHeads * HeadDim, true, dtype, device);
        _recencyGate = new Projection(d, KvHeads * HeadDim, true, dtype, device);
        _alpha = new Parameter(zeros(2, dtype: ScalarType.Float32, device: device), requires_grad: false);
        RegisterComponents();
    }

    /// <inheritdoc/>
    public override DslaVariant Variant => DslaVariant.Dsla;

    /// <summary>The history gate projection gk_proj.</summary>
    public Projection HistoryGate => _historyGate;

    /// <summary>The recency gate projection gk_proj2.</summary>
    public Projection RecencyGate => _recencyGate;

    /// <summary>q_proj.</summary>
    public Projection QueryProjection => _q;

    /// <summary>The mixing logits alpha_list [2].</summary>
    public Parameter Alpha => _alpha;

    /// <summary>γ = softmax(alpha_list)[0], the weight of the history state.</summary>
    public double Gamma => MixWeight(_alpha);

    /// <summary>
    /// A DSLA layer initialised from the softmax layer it replaces. q/k/v/o are copied from the teacher — a deliberate
    /// departure from the reference code, which random-initialises them (dsla-paper.md §6.2.2, §7.1.2): copying is the
    /// standard linearisation start and, with GQA-native states, the shapes match the teacher exactly. gk_proj = the
    /// (rectangular) identity with bias 0; gk_proj2 = nn.Linear's default U(±1/√D) with bias 0; alpha_list ~ U(0, 1).
    /// Seeded, on the teacher's device and dtype.
    /// </summary>
    public static DslaAttention FromTeacher(LlamaAttention teacher, LlamaConfig config, long seed)
    {
        ArgumentNullException.ThrowIfNull(teacher);
        var weight = teacher.QueryProjection.Weight;
        var layer = new DslaAttention(config, weight.dtype, weight.device);
        try
        {
            using var generator = Init.CpuGenerator(seed);
            using (no_grad())
            {
                Init.CopyProjection(layer._q, teacher.QueryProjection);
                Init.CopyProjection(layer._k, teacher.KeyProjection);
                Init.CopyProjection(layer._v, teacher.ValueProjection);
                Init.CopyProjection(layer._o, teacher.OutputProjection);
                Init.Identity(layer._historyGate);
                Init.LinearDefault(layer._recencyGate, generator);
                Init.Uniform(layer._alpha, 0, 1, generator);
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
        var q = SplitHeads(_q.forward(x), Heads);                              // [B, H, T, hd]
        var k = SplitHeads(_k.forward(x), KvHeads);                            // [B, Hkv, T, hd]
        var v = SplitHeads(_v.forward(x), KvHeads);                            // [B, Hkv, T, hd]
        var history = SplitHeads(LogGate(_historyGate.forward(x)), KvHeads);   // [B, Hkv, T, hd] fp32
        var recency = SplitHeads(LogGate(_recencyGate.forward(x)), KvHeads);
        return (q.MoveToOuterDisposeScope(), k.MoveToOuterDisposeScope(), v.MoveToOuterDisposeScope(),
            [history.MoveToOuterDisposeScope(), recency.MoveToOuterDisposeScope()]);
    }

    /// <inheritdoc/>
    protected override Tensor Combine(Tensor[] outputs) => MixOutputs(_alpha, outputs);

    /// <inheritdoc/>
    protected override Tensor ProjectOutput(Tensor merged) => _o.forward(merged);

    /// <summary>softmax(alpha)[0]·o₀ + softmax(alpha)[1]·o₁ in fp32.</summary>
    internal static Tensor MixOutputs(Parameter alpha, Tensor[] outputs)
    {
        using var scope = NewDisposeScope();
        // [2] → [2, 1, 1, 1, 1] against the stacked [2, B, H, T, dv]: three ops instead of five.
        var weights = alpha.Fp32().softmax(0).view(2, 1, 1, 1, 1);
        return (stack(outputs, 0) * weights).sum(0L).MoveToOuterDisposeScope();
    }

    /// <summary>softmax(alpha)[0].</summary>
    internal static double MixWeight(Parameter alpha)
    {
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        return alpha.to(ScalarType.Float32).softmax(0)[0].item<float>();
    }
}

using DslaMesh.Engine.Inference;
using DslaMesh.Engine.Models;
using TorchSharp.Modules;
using TorchSharp.Utils;
using static TorchSharp.torch;

namespace DslaMesh.Engine.Dsla;

/// <summary>
/// A dual-state layer whose states can be rebuilt exactly from the replaced softmax layer's KV cache, so a layer can be
/// converted under in-flight sequences without dropping their history (dsla-paper.md §7.2.1).
/// <para>
/// Keys and values ARE the teacher's: the layer holds references to the teacher's k_proj / v_proj (shared, frozen,
/// never copied, never saved with the DSLA weights), and uses the pre-RoPE key. Queries and output come from its own
/// q_proj / o_proj (initialised from the teacher's). Both gate sets are functions of the pre-RoPE key of their KV head:
/// logGate = clamp_min(logsigmoid(k W_g[h] + b_g[h]) / 16, −50) with W_g [Hkv, hd, hd] and b_g [Hkv, hd] (gk_proj:
/// history, W initialised to the identity; gk_proj2: recency, nn.Linear-style U(±1/√hd)). γ = softmax(alpha_list)[0].
/// </para>
/// <para>
/// Folding: the cache holds K after RoPE at positions 0..L−1 and V as is; undoing the rotation gives the pre-RoPE keys,
/// hence the gates, hence both states (<see cref="DslaOps.FinalStates"/>). Exact up to fp32 rounding in an fp32 model;
/// in bf16 the cached K carries one bf16 rounding of the rotated key.
/// </para>
/// </summary>
public sealed class FoldableDslaAttention : GatedLinearMixer
{
    [ComponentName(Name = "q_proj")]
    private readonly Projection _q;
    [ComponentName(Name = "o_proj")]
    private readonly Projection _o;
    [ComponentName(Name = "gk_proj")]
    private readonly HeadwiseGate _historyGate;
    [ComponentName(Name = "gk_proj2")]
    private readonly HeadwiseGate _recencyGate;
    [ComponentName(Name = "alpha_list")]
    private readonly Parameter _alpha;   // [2] fp32 mixing logits
    // Not a registered component (a plain record): the teacher's projections are shared, frozen and owned by the teacher.
    private readonly TeacherKeyValue _teacher;
    private readonly RotaryEmbedding? _rotary;

    /// <summary>
    /// Allocates the layer over <paramref name="teacher"/>'s k/v projections, its own weights uninitialised.
    /// <paramref name="rotary"/> (the model's table) lets <see cref="ITokenMixer.Forward"/> fold KV caches it meets.
    /// </summary>
    public FoldableDslaAttention(LlamaConfig config, LlamaAttention teacher, RotaryEmbedding? rotary) : base("FoldableDslaAttention", config, 2)
    {
        ArgumentNullException.ThrowIfNull(teacher);
        if (teacher.KvHeads != KvHeads || teacher.HeadDim != HeadDim || teacher.Heads != Heads)
        {
            throw new ArgumentException($"Teacher attention ({teacher.Heads} heads, {teacher.KvHeads} KV heads, head_dim {teacher.HeadDim}) does not match the config.", nameof(teacher));
        }
        var weight = teacher.QueryProjection.Weight;
        var (dtype, device) = (weight.dtype, weight.device);
        _q = new Projection(config.HiddenSize, Heads * HeadDim, config.AttentionBias, dtype, device);
        _o = new Projection(Heads * HeadDim, config.HiddenSize, config.AttentionBias, dtype, device);
        _historyGate = new HeadwiseGate(KvHeads, HeadDim, dtype, device);
        _recencyGate = new HeadwiseGate(KvHeads, HeadDim, dtype, device);
        _alpha = new Parameter(zeros(2, dtype: ScalarType.Float32, device: device), requires_grad: false);
        _teacher = new TeacherKeyValue(teacher.KeyProjection, teacher.ValueProjection);
        _rotary = rotary;
        RegisterComponents();
    }

    /// <inheritdoc/>
    public override DslaVariant Variant => DslaVariant.DslaFoldable;

    /// <inheritdoc/>
    public override bool CanFold => true;

    /// <summary>q_proj.</summary>
    public Projection QueryProjection => _q;

    /// <summary>The history gate gk_proj.</summary>
    public HeadwiseGate HistoryGate => _historyGate;

    /// <summary>The recency gate gk_proj2.</summary>
    public HeadwiseGate RecencyGate => _recencyGate;

    /// <summary>γ = softmax(alpha_list)[0], the weight of the history state.</summary>
    public double Gamma => DslaAttention.MixWeight(_alpha);

    /// <summary>
    /// A foldable layer initialised from the teacher: q/o copied (see <see cref="DslaAttention.FromTeacher"/>), k/v shared,
    /// history gate identity, recency gate U(±1/√hd), gate biases 0, alpha_list ~ U(0, 1). Seeded.
    /// </summary>
    public static FoldableDslaAttention FromTeacher(LlamaAttention teacher, LlamaConfig config, RotaryEmbedding? rotary, long seed)
    {
        ArgumentNullException.ThrowIfNull(teacher);
        var layer = new FoldableDslaAttention(config, teacher, rotary);
        try
        {
            using var generator = Init.CpuGenerator(seed);
            using (no_grad())
            {
                Init.CopyProjection(layer._q, teacher.QueryProjection);
                Init.CopyProjection(layer._o, teacher.OutputProjection);
                layer._historyGate.InitializeIdentity();
                layer._recencyGate.InitializeUniform(generator);
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

    /// <summary>Folds one sequence's KV cache of the replaced layer into a new state (the cache is left untouched).</summary>
    public DslaState Fold(KvState kv, RotaryEmbedding rotary) => Fold([kv], rotary)[0];

    /// <summary>
    /// Folds several sequences' KV caches in one batched pass: each row's keys are un-rotated at its own positions
    /// 0..L−1, then rows are left-padded with zero keys/values to the longest (zeros add nothing to a state that starts
    /// at zero). The caches are left untouched.
    /// </summary>
    public DslaState[] Fold(IReadOnlyList<KvState> caches, RotaryEmbedding rotary)
    {
        ArgumentNullException.ThrowIfNull(caches);
        ArgumentNullException.ThrowIfNull(rotary);
        if (caches.Count == 0)
        {
            return [];
        }
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        var device = _q.Weight.device;
        var longest = caches.Max(c => c.Length);
        if (longest == 0)
        {
            return caches.Select(_ => new DslaState(StateCount, KvHeads, HeadDim, HeadDim, device)).ToArray();
        }
        var keys = new Tensor[caches.Count];
        var values = new Tensor[caches.Count];
        for (var i = 0; i < caches.Count; i++)
        {
            var (cachedKeys, cachedValues) = caches[i].View();                                  // [1, Hkv, L, hd]
            var length = caches[i].Length;
            var (cos, sin) = rotary.At(arange(length, device: device).unsqueeze(0), ScalarType.Float32);   // [1, 1, L, hd]
            var preRope = RotaryEmbedding.Invert(cachedKeys.to(ScalarType.Float32), cos, sin);
            var pad = longest - length;
            keys[i] = pad == 0 ? preRope : nn.functional.pad(preRope, [0, 0, pad, 0]);
            values[i] = pad == 0 ? cachedValues.to(ScalarType.Float32) : nn.functional.pad(cachedValues.to(ScalarType.Float32), [0, 0, pad, 0]);
        }
        var k = keys.Length == 1 ? keys[0] : cat(keys, 0);                                      // [N, Hkv, Lmax, hd] fp32
        var v = values.Length == 1 ? values[0] : cat(values, 0);
        var (historyGates, recencyGates) = HeadwiseGate.LogGates(_historyGate, _recencyGate, k);
        var finals = DslaOps.FinalStates(k, v, [historyGates, recencyGates]);
        return Enumerable.Range(0, caches.Count)
            .Select(i => new DslaState(finals.Select(f => f.narrow(0, i, 1)).ToArray()))
            .ToArray();
    }

    /// <summary>
    /// Folds layer <paramref name="layer"/> of every cache that still holds a KV cache there (one batched fold) and replaces
    /// the entry, which frees the KV memory. Sequences already holding DSLA states are left alone. Returns how many folded.
    /// </summary>
    public int FoldInto(IReadOnlyList<SequenceCache> caches, int layer, RotaryEmbedding? rotary = null)
    {
        ArgumentNullException.ThrowIfNull(caches);
        var pending = caches.Where(c => c[layer] is KvState).ToList();
        if (pending.Count == 0)
        {
            return 0;
        }
        var table = rotary ?? _rotary ?? throw new InvalidOperationException("No rotary table to undo RoPE with: pass the model's RotaryEmbedding.");
        var folded = Fold(pending.Select(c => (KvState)c[layer]!).ToList(), table);
        for (var i = 0; i < pending.Count; i++)
        {
            pending[i][layer] = folded[i];
        }
        return pending.Count;
    }

    /// <inheritdoc/>
    protected override DslaState[] FoldCaches(IReadOnlyList<KvState> caches, int layer) =>
        Fold(caches, _rotary ?? throw new InvalidOperationException(
            $"Layer {layer} holds a KV cache to fold, but this foldable DSLA layer was built without the model's rotary table."));

    /// <inheritdoc/>
    protected override (Tensor Q, Tensor K, Tensor V, Tensor[] LogGates) Features(Tensor x)
    {
        using var scope = NewDisposeScope();
        var q = SplitHeads(_q.forward(x), Heads);                          // [B, H, T, hd]
        var k = SplitHeads(_teacher.Key.forward(x), KvHeads);              // [B, Hkv, T, hd], pre-RoPE
        var v = SplitHeads(_teacher.Value.forward(x), KvHeads);            // [B, Hkv, T, hd]
        var (history, recency) = HeadwiseGate.LogGates(_historyGate, _recencyGate, k);   // [B, Hkv, T, hd] fp32 each
        return (q.MoveToOuterDisposeScope(), k.MoveToOuterDisposeScope(), v.MoveToOuterDisposeScope(),
            [history.MoveToOuterDisposeScope(), recency.MoveToOuterDisposeScope()]);
    }

    /// <inheritdoc/>
    protected override Tensor Combine(Tensor[] outputs) => DslaAttention.MixOutputs(_alpha, outputs);

    /// <inheritdoc/>
    protected override Tensor ProjectOutput(Tensor merged) => _o.forward(merged);

    private sealed record TeacherKeyValue(Projection Key, Projection Value);
}

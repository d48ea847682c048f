using DslaMesh.Engine.Inference;
using DslaMesh.Engine.Models;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace DslaMesh.Engine.Dsla;

/// <summary>
/// Shared machinery of the gated-linear-attention mixers (DSLA, foldable DSLA, GLA): the per-sequence state handling
/// behind <see cref="ITokenMixer.Forward"/>. A subclass supplies the features (q, k, v and one fp32 log-gate per state),
/// how the per-state outputs combine, and the output projection.
/// <para>
/// Without caches (training, evaluation) the chunked form runs from zero state over the whole sequence, through
/// differentiable ops only. With caches, every row gets its <see cref="DslaState"/> from its cache (created at zero for a
/// new sequence, folded from a <see cref="KvState"/> where the variant can fold); all rows of the pass are processed
/// together with their states stacked (DSLA ignores positions, and every row of a pass has the same T); T &gt; 1 uses
/// the chunked form, T = 1 the recurrent step. The new states overwrite the old ones in place.
/// </para>
/// </summary>
public abstract class GatedLinearMixer : nn.Module, ITokenMixer
{
    /// <summary>The reference code divides the gate log-sigmoid by 16 (at z = 0 the state halves every 16 tokens).</summary>
    public const double GateLogitNormalizer = 16.0;

    /// <summary>Lower clamp of the log-gate.</summary>
    public const double GateClampMin = -50.0;

    private int? _chunkSize;

    protected GatedLinearMixer(string name, LlamaConfig config, int stateCount) : base(name)
    {
        ArgumentNullException.ThrowIfNull(config);
        HiddenSize = config.HiddenSize;
        Heads = config.NumAttentionHeads;
        KvHeads = config.NumKeyValueHeads;
        HeadDim = config.HeadDim;
        StateCount = stateCount;
    }

    /// <summary>Model width D.</summary>
    public int HiddenSize { get; }

    /// <summary>Query heads H.</summary>
    public int Heads { get; }

    /// <summary>KV heads Hkv: states live per KV head.</summary>
    public int KvHeads { get; }

    /// <summary>Head dimension (dk = dv = head_dim).</summary>
    public int HeadDim { get; }

    /// <summary>States per sequence (2 for DSLA, 1 for GLA).</summary>
    public int StateCount { get; }

    /// <summary>Chunk length of the chunked form (prefill and training); null (the default) picks
    /// <see cref="DslaOps.ChunkSizeFor"/> the input's device. Smaller chunks need less memory per token
    /// (B·Hkv·T·C·hd floats for the pairwise decays); 16–64 are sensible.</summary>
    public int? ChunkSize
    {
        get => _chunkSize;
        set
        {
            if (value is { } size)
            {
                ArgumentOutOfRangeException.ThrowIfLessThan(size, 1);
            }
            _chunkSize = value;
        }
    }

    /// <summary>Which variant this is.</summary>
    public abstract DslaVariant Variant { get; }

    /// <summary>Whether a <see cref="KvState"/> of the replaced softmax layer can be folded into this mixer's state.</summary>
    public virtual bool CanFold => false;

    /// <summary>Bytes of one sequence's state: StateCount × Hkv × dk × dv fp32.</summary>
    public long StateBytesPerSequence => (long)StateCount * KvHeads * HeadDim * HeadDim * sizeof(float);

    /// <summary>The parameters distillation trains (all own parameters; shared teacher weights are excluded).</summary>
    public virtual IEnumerable<Parameter> TrainableParameters() => parameters();

    /// <summary>Turns gradients on or off for <see cref="TrainableParameters"/>. Off by default (serving).</summary>
    public void SetTrainable(bool trainable)
    {
        foreach (var parameter in TrainableParameters())
        {
            parameter.requires_grad = trainable;
        }
    }

    /// <summary>
    /// x [B, T, D] → q [B, H, T, hd], k and v [B, Hkv, T, hd] (model dtype, no RoPE) and <see cref="StateCount"/> log-gates
    /// [B, Hkv, T, hd] (fp32, ≤ 0).
    /// </summary>
    protected abstract (Tensor Q, Tensor K, Tensor V, Tensor[] LogGates) Features(Tensor x);

    /// <summary>Combines the per-state outputs (each [B, H, T, hd] fp32) into one [B, H, T, hd] fp32.</summary>
    protected abstract Tensor Combine(Tensor[] outputs);

    /// <summary>Output projection [B, T, H·hd] → [B, T, D].</summary>
    protected abstract Tensor ProjectOutput(Tensor merged);

    /// <summary>Folds softmax KV caches of this layer into states. Only foldable variants override it.</summary>
    /// <exception cref="InvalidOperationException">This variant cannot fold.</exception>
    protected virtual DslaState[] FoldCaches(IReadOnlyList<KvState> caches, int layer) => throw new InvalidOperationException(
        $"Layer {layer} of this sequence holds a softmax KV cache, and the '{DslaVariants.Name(Variant)}' variant cannot rebuild its states " +
        "from it: its keys, values and gates are functions of the layer inputs, which the KV cache does not hold. Use the 'dsla-foldable' " +
        "variant to convert in-flight sequences, or convert this layer only for new sequences.");

    /// <summary>
    /// Folds layer <paramref name="layer"/> of every cache that still holds a softmax KV cache there into this mixer's
    /// states in one batched pass, replacing the entries (which frees the KV memory). Returns how many were folded.
    /// </summary>
    /// <exception cref="InvalidOperationException">This variant cannot fold.</exception>
    public int FoldLayer(IReadOnlyList<SequenceCache> caches, int layer)
    {
        ArgumentNullException.ThrowIfNull(caches);
        var pending = caches.Where(c => c[layer] is KvState).ToList();
        if (pending.Count == 0)
        {
            return 0;
        }
        var folded = FoldCaches(pending.Select(c => (KvState)c[layer]!).ToList(), layer);
        for (var i = 0; i < pending.Count; i++)
        {
            pending[i][layer] = folded[i];
        }
        return pending.Count;
    }

    /// <summary>The log-gates [B, Hkv, T, hd] fp32 for x [B, T, D] (for the gate cosine loss in distillation).</summary>
    public Tensor[] LogGates(Tensor x)
    {
        using var scope = NewDisposeScope();
        var (_, _, _, gates) = Features(x);
        foreach (var gate in gates)
        {
            gate.MoveToOuterDisposeScope();
        }
        return gates;
    }

    /// <summary>
    /// Runs the layer on x [B, T, D] from the given states (each [B, Hkv, hd, hd], or null for zeros) with the chunked
    /// form (T &gt; 1) or the recurrent step (T = 1). Returns the output [B, T, D] and the final states (fp32).
    /// </summary>
    public (Tensor Output, Tensor[] States) Run(Tensor x, IReadOnlyList<Tensor?>? initialStates = null)
    {
        ArgumentNullException.ThrowIfNull(x);
        using var scope = NewDisposeScope();
        var (b, t) = (x.shape[0], x.shape[1]);
        var (q, k, v, gates) = Features(x);
        var (outputs, states) = t == 1
            ? DslaOps.Recurrent(q, k, v, gates, initialStates)
            : DslaOps.Chunked(q, k, v, gates, initialStates, ChunkSize ?? DslaOps.ChunkSizeFor(x.device));
        var mixed = Combine(outputs).to(x.dtype);                          // [B, H, T, hd]
        var merged = mixed.transpose(1, 2).reshape(b, t, Heads * HeadDim);  // [B, T, H·hd]
        var output = ProjectOutput(merged).MoveToOuterDisposeScope();
        foreach (var state in states)
        {
            state.MoveToOuterDisposeScope();
        }
        return (output, states);
    }

    /// <inheritdoc/>
    public Tensor Forward(Tensor x, ForwardContext context, int layer)
    {
        ArgumentNullException.ThrowIfNull(x);
        ArgumentNullException.ThrowIfNull(context);
        using var scope = NewDisposeScope();
        if (context.Caches is not { } caches)
        {
            var (free, _) = Run(x);
            return free.MoveToOuterDisposeScope();
        }
        var rows = StatesFor(caches, context.StartPositions, layer, x.device);
        var initial = new Tensor?[StateCount];
        for (var i = 0; i < StateCount; i++)
        {
            // [B, Hkv, hd, hd]: each row's state stacked along the batch axis.
            initial[i] = rows.Length == 1 ? rows[0][i] : cat(rows.Select(r => r[i]).ToArray(), 0);
        }
        var (output, finals) = Run(x, initial);
        for (var row = 0; row < rows.Length; row++)
        {
            for (var i = 0; i < StateCount; i++)
            {
                rows[row].Store(i, rows.Length == 1 ? finals[i] : finals[i].narrow(0, row, 1));
            }
        }
        return output.MoveToOuterDisposeScope();
    }

    /// <summary>
    /// Each row's state for <paramref name="layer"/>: existing DSLA states as they are, softmax KV caches folded (one batched
    /// fold; the cache entry is replaced, which frees the KV memory), fresh zero states for sequences that start here.
    /// </summary>
    private DslaState[] StatesFor(IReadOnlyList<SequenceCache> caches, int[] startPositions, int layer, Device device)
    {
        var kvRows = Enumerable.Range(0, caches.Count).Where(r => caches[r][layer] is KvState).ToList();
        foreach (var row in kvRows)
        {
            var length = ((KvState)caches[row][layer]!).Length;
            if (length != startPositions[row])
            {
                throw new InvalidOperationException($"Layer {layer}'s KV cache holds {length} positions but the sequence is at position {startPositions[row]}; it cannot be folded.");
            }
        }
        if (kvRows.Count > 0)
        {
            var folded = FoldCaches(kvRows.Select(r => (KvState)caches[r][layer]!).ToList(), layer);
            for (var i = 0; i < kvRows.Count; i++)
            {
                caches[kvRows[i]][layer] = folded[i];
            }
        }
        var states = new DslaState[caches.Count];
        for (var row = 0; row < caches.Count; row++)
        {
            var cache = caches[row];
            switch (cache[layer])
            {
                case DslaState state when state.Count == StateCount && state[0].shape[1] == KvHeads && state[0].shape[2] == HeadDim:
                    states[row] = state;
                    break;
                case DslaState state:
                    throw new InvalidOperationException(
                        $"Layer {layer} of this sequence holds {state.Count} state(s) of shape [{string.Join(", ", state[0].shape)}], but the " +
                        $"'{DslaVariants.Name(Variant)}' layer needs {StateCount} of [1, {KvHeads}, {HeadDim}, {HeadDim}].");
                case null when startPositions[row] > 0:
                    throw new InvalidOperationException(
                        $"Layer {layer} has no state for a sequence already at position {startPositions[row]}; its history cannot be recovered.");
                case null:
                    states[row] = new DslaState(StateCount, KvHeads, HeadDim, HeadDim, device);
                    cache[layer] = states[row];
                    break;
                case var other:
                    throw new InvalidOperationException($"Layer {layer} of this sequence holds a {other.GetType().Name}, which a DSLA layer cannot resume from.");
            }
        }
        return states;
    }

    /// <summary>
    /// The log-gate of the reference code from a gate pre-activation z (any dtype):
    /// clamp_min(logsigmoid(z) / 16, −50), computed in fp32.
    /// </summary>
    public static Tensor LogGate(Tensor preactivation)
    {
        ArgumentNullException.ThrowIfNull(preactivation);
        using var scope = NewDisposeScope();
        // log σ(z) = −softplus(−z): the same values, and softplus is a plain elementwise kernel where log_sigmoid
        // allocates a second buffer (it was an eighth of a DSLA layer's decode time on CPU).
        var gate = nn.functional.softplus(preactivation.Fp32().neg()) * (-1.0 / GateLogitNormalizer);
        return gate.clamp_min(GateClampMin).MoveToOuterDisposeScope();
    }

    /// <summary>[B, T, heads·hd] → [B, heads, T, hd].</summary>
    protected Tensor SplitHeads(Tensor x, int heads) => x.view(x.shape[0], x.shape[1], heads, HeadDim).transpose(1, 2);
}

using TorchSharp;
using static TorchSharp.torch;

namespace DslaMesh.Engine.Dsla;

/// <summary>
/// Gated linear attention (the maths of one DSLA state; dsla-paper.md §1.3–1.4), in fp32 and GQA-native: states live per
/// KV head and the Hq/Hkv query heads of a group read their KV head's state (query head h uses KV head h / group, as
/// Hugging Face's <c>repeat_kv</c> does).
/// <para>
/// Shapes: q [B, Hq, T, dk], k [B, Hkv, T, dk], v [B, Hkv, T, dv], log-gate [B, Hkv, T, dk] (≤ 0), state
/// [B, Hkv, dk, dv]. Per token t: S ← diag(exp(g_t))·S; S ← S + k_tᵀ v_t; o_t = scale·q_t·S with scale = dk^-½.
/// </para>
/// <para>
/// Every entry point casts q, k, v and the gates to fp32 and returns fp32 outputs and states, whatever the model dtype.
/// All ops are out-of-place, so both forms are differentiable (the chunked form is the training path). Several gate sets
/// over the same q, k, v (DSLA's two states) share the casting, padding and reshaping; the recurrent form also shares
/// the k_tᵀ v_t outer products. With per-key-dimension gates the intra-chunk q·k products cannot be shared, because the
/// decay sits inside the sum over k.
/// </para>
/// </summary>
public static class DslaOps
{
    /// <summary>Default chunk length of the chunked form (CUDA and training: fewer, larger launches).</summary>
    public const int DefaultChunkSize = 64;

    /// <summary>
    /// Chunk length on CPU. There the [C, C, dk] pairwise decays' memory traffic dominates (work per token grows with
    /// C): with brown-8l at 50% DSLA a 256-token prefill took 123 ms with C = 64 and 58 ms with C = 16 (attention:
    /// 38 ms), and C = 8 was no faster at 1024 tokens (dslactl bench serve, 2-core development machine).
    /// </summary>
    public const int CpuChunkSize = 16;

    /// <summary>The chunk length that suits a device.</summary>
    public static int ChunkSizeFor(Device device) => device?.type == DeviceType.CPU ? CpuChunkSize : DefaultChunkSize;

    /// <summary>
    /// Upper bound on the elements of one pairwise-decay tensor [B, Hkv, chunks, C, C, dk]; the chunked form processes as
    /// many chunks at once as fit (at least one). 2^25 fp32 = 128 MiB.
    /// </summary>
    public const long DefaultBlockElements = 1L << 25;

    /// <summary>
    /// Recurrent form for one gate set. Returns the outputs [B, Hq, T, dv] and the state after the last token
    /// [B, Hkv, dk, dv] (both fp32). <paramref name="initialState"/> null means zeros.
    /// </summary>
    public static (Tensor Output, Tensor State) Recurrent(Tensor q, Tensor k, Tensor v, Tensor logGate, Tensor? initialState = null, double? scale = null)
    {
        using var scope = NewDisposeScope();
        var (outputs, states) = Recurrent(q, k, v, [logGate], [initialState], scale);
        return (outputs[0].MoveToOuterDisposeScope(), states[0].MoveToOuterDisposeScope());
    }

    /// <summary>
    /// Recurrent form for several gate sets over the same q, k, v (one output and one state per gate set). The k_tᵀ v_t
    /// products are computed once. <paramref name="initialStates"/>: null, or one entry (null = zeros) per gate set.
    /// </summary>
    public static (Tensor[] Outputs, Tensor[] States) Recurrent(
        Tensor q, Tensor k, Tensor v, IReadOnlyList<Tensor> logGates, IReadOnlyList<Tensor?>? initialStates = null, double? scale = null)
    {
        ArgumentNullException.ThrowIfNull(logGates);
        var shape = Validate(q, k, v, logGates, initialStates);
        using var scope = NewDisposeScope();
        var (b, hkv, g, t, dk, dv) = shape;
        var s = scale ?? 1.0 / Math.Sqrt(dk);
        if (t == 1)
        {
            return SingleStep(q, k, v, logGates, initialStates, s, shape);
        }
        var qs = q.to(ScalarType.Float32).reshape(b, hkv, g, t, dk) * s;   // [B, Hkv, G, T, dk]
        var k32 = k.to(ScalarType.Float32);                             // [B, Hkv, T, dk]
        var v32 = v.to(ScalarType.Float32);                             // [B, Hkv, T, dv]
        var sets = logGates.Count;
        var state = new Tensor[sets];
        var decay = new Tensor[sets];
        var steps = new Tensor[sets][];
        for (var i = 0; i < sets; i++)
        {
            state[i] = InitialState(initialStates, i, b, hkv, dk, dv, q.device);
            decay[i] = logGates[i].to(ScalarType.Float32).exp().unsqueeze(-1);   // [B, Hkv, T, dk, 1]
            steps[i] = new Tensor[t];
        }
        for (var step = 0; step < t; step++)
        {
            // k_tᵀ v_t: [B, Hkv, dk, 1] × [B, Hkv, 1, dv] → [B, Hkv, dk, dv], shared by every gate set.
            var kv = k32.select(2, step).unsqueeze(-1) * v32.select(2, step).unsqueeze(-2);
            var query = qs.select(3, step);                                      // [B, Hkv, G, dk]
            for (var i = 0; i < sets; i++)
            {
                state[i] = (state[i] * decay[i].select(2, step)) + kv;           // decay first, then add
                steps[i][step] = matmul(query, state[i]);                        // then read: [B, Hkv, G, dv]
            }
        }
        var outputs = new Tensor[sets];
        for (var i = 0; i < sets; i++)
        {
            // [B, Hkv, G, T, dv] → [B, Hq, T, dv]
            outputs[i] = stack(steps[i], 3).view(b, hkv * g, t, dv).MoveToOuterDisposeScope();
            state[i] = state[i].MoveToOuterDisposeScope();
        }
        return (outputs, state);
    }

    /// <summary>
    /// One decode step (T = 1) of <see cref="Recurrent(Tensor, Tensor, Tensor, IReadOnlyList{Tensor}, IReadOnlyList{Tensor?}?, double?)"/>
    /// without the per-step bookkeeping of the general loop: about half the tensor ops, which is what a decode step's
    /// cost is made of (each op costs microseconds of host time, the arithmetic is tiny).
    /// </summary>
    private static (Tensor[] Outputs, Tensor[] States) SingleStep(
        Tensor q, Tensor k, Tensor v, IReadOnlyList<Tensor> logGates, IReadOnlyList<Tensor?>? initialStates, double scale,
        (long B, long Hkv, long Group, long T, long Dk, long Dv) shape)
    {
        var (b, hkv, g, _, dk, dv) = shape;
        var query = q.Fp32().view(b, hkv, g, dk) * scale;                                      // [B, Hkv, G, dk]
        var kv = k.Fp32().view(b, hkv, dk, 1) * v.Fp32().view(b, hkv, 1, dv);                    // k_tᵀ v_t: [B, Hkv, dk, dv]
        var states = new Tensor[logGates.Count];
        for (var i = 0; i < logGates.Count; i++)
        {
            var decay = logGates[i].Fp32().reshape(b, hkv, dk, 1).exp();                            // [B, Hkv, dk, 1]
            var state = initialStates?[i] is { } given ? given.Fp32() * decay + kv : kv;             // decay first, then add
            states[i] = state.MoveToOuterDisposeScope();
        }
        // Every state read by one batched matmul: [1, B, Hkv, G, dk] × [S, B, Hkv, dk, dv] → [S, B, Hkv, G, dv].
        var read = matmul(query.unsqueeze(0), stack(states, 0));
        var outputs = new Tensor[states.Length];
        for (var i = 0; i < states.Length; i++)
        {
            outputs[i] = read[i].reshape(b, hkv * g, 1, dv).MoveToOuterDisposeScope();                 // [B, Hq, 1, dv]
        }
        return (outputs, states);
    }

    /// <summary>
    /// Chunked parallel form for one gate set (same inputs and results as <see cref="Recurrent(Tensor, Tensor, Tensor, Tensor, Tensor?, double?)"/>
    /// up to fp32 rounding). T need not be a multiple of <paramref name="chunkSize"/>.
    /// </summary>
    public static (Tensor Output, Tensor State) Chunked(
        Tensor q, Tensor k, Tensor v, Tensor logGate, Tensor? initialState = null, int chunkSize = DefaultChunkSize, double? scale = null, int? chunksPerBlock = null)
    {
        using var scope = NewDisposeScope();
        var (outputs, states) = Chunked(q, k, v, [logGate], [initialState], chunkSize, scale, chunksPerBlock);
        return (outputs[0].MoveToOuterDisposeScope(), states[0].MoveToOuterDisposeScope());
    }

    /// <summary>
    /// Chunked parallel form (dsla-paper.md §1.4) for several gate sets over the same q, k, v. Within a chunk of C tokens,
    /// with B_i the within-chunk cumulative log-gate and S the state before the chunk:
    /// <code>
    /// o_i    = scale·[ (q_i ⊙ exp(B_i)) S + Σ_{j≤i} (Σ_k q_i[k] k_j[k] exp(B_i[k] − B_j[k])) v_j ]
    /// S_next = diag(exp(B_C)) S + Σ_j (k_j ⊙ exp(B_C − B_j))ᵀ v_j
    /// </code>
    /// The pairwise differences B_i − B_j are formed explicitly, and j &gt; i is masked to −∞ before the exponential, so no
    /// exp(−B) ever appears (it overflows for small gates). T is zero-padded to whole chunks (k = v = 0 and log-gate 0 leave
    /// the state unchanged). Chunks are processed <paramref name="chunksPerBlock"/> at a time (default: as many as keep
    /// one [B, Hkv, chunks, C, C, dk] tensor under <see cref="DefaultBlockElements"/>), carrying the state between blocks.
    /// </summary>
    public static (Tensor[] Outputs, Tensor[] States) Chunked(
        Tensor q, Tensor k, Tensor v, IReadOnlyList<Tensor> logGates, IReadOnlyList<Tensor?>? initialStates = null,
        int chunkSize = DefaultChunkSize, double? scale = null, int? chunksPerBlock = null)
    {
        ArgumentNullException.ThrowIfNull(logGates);
        ArgumentOutOfRangeException.ThrowIfLessThan(chunkSize, 1);
        var shape = Validate(q, k, v, logGates, initialStates);
        using var scope = NewDisposeScope();
        var (b, hkv, g, t, dk, dv) = shape;
        var c = (int)Math.Min(chunkSize, t);
        var chunks = (t + c - 1) / c;
        var pad = (chunks * c) - t;
        var s = scale ?? 1.0 / Math.Sqrt(dk);

        // Padded, chunked, fp32 operands.
        var qc = PadTime(q.to(ScalarType.Float32).reshape(b, hkv, g, t, dk) * s, pad)
            .reshape(b, hkv, g, chunks, c, dk).permute(0, 1, 3, 4, 2, 5);                   // [B, Hkv, N, C, G, dk]
        var kc = PadTime(k.to(ScalarType.Float32), pad).reshape(b, hkv, chunks, c, dk);      // [B, Hkv, N, C, dk]
        var vc = PadTime(v.to(ScalarType.Float32), pad).reshape(b, hkv, chunks, c, dv);      // [B, Hkv, N, C, dv]
        var future = ones(c, c, dtype: ScalarType.Bool, device: q.device).triu(1).unsqueeze(-1);  // [C_i, C_j, 1]: j > i

        var perChunk = b * hkv * (long)c * c * dk;
        var block = chunksPerBlock ?? (int)Math.Clamp(DefaultBlockElements / Math.Max(perChunk, 1), 1, chunks);
        ArgumentOutOfRangeException.ThrowIfLessThan(block, 1, nameof(chunksPerBlock));

        var sets = logGates.Count;
        var outputs = new Tensor[sets];
        var finals = new Tensor[sets];
        for (var i = 0; i < sets; i++)
        {
            var gc = PadTime(logGates[i].to(ScalarType.Float32), pad).reshape(b, hkv, chunks, c, dk);   // [B, Hkv, N, C, dk]
            var state = InitialState(initialStates, i, b, hkv, dk, dv, q.device);
            var pieces = new List<Tensor>();
            for (var start = 0; start < chunks; start += block)
            {
                var n = Math.Min(block, chunks - start);
                // Each block's temporaries die with its scope (autograd keeps what backward needs).
                using var blockScope = NewDisposeScope();
                var (piece, next) = ChunkBlock(qc.narrow(2, start, n), kc.narrow(2, start, n), vc.narrow(2, start, n), gc.narrow(2, start, n), state, future);
                pieces.Add(piece.MoveToOuterDisposeScope());
                state = next.MoveToOuterDisposeScope();
            }
            var all = pieces.Count == 1 ? pieces[0] : cat(pieces, 2);                          // [B, Hkv, N, C, G, dv]
            // → [B, Hkv, G, N, C, dv] → [B, Hq, N·C, dv] → drop the padding.
            outputs[i] = all.permute(0, 1, 4, 2, 3, 5).reshape(b, hkv * g, chunks * c, dv).narrow(2, 0, t).MoveToOuterDisposeScope();
            finals[i] = state.MoveToOuterDisposeScope();
        }
        return (outputs, finals);
    }

    /// <summary>
    /// Only the final states after k [B, Hkv, T, dk], v [B, Hkv, T, dv] and each log-gate [B, Hkv, T, dk], from the given
    /// initial states (null: zeros), in one pass with no queries (folding a KV cache):
    /// <code>S_T = diag(exp(Σ_r g_r)) S₀ + Σ_s (k_s ⊙ exp(Σ_{r&gt;s} g_r))ᵀ v_s</code>
    /// The exponents are exclusive suffix sums of the log-gates (all ≤ 0, accumulated from the newest token backwards, so
    /// the recent tokens that dominate the state carry the least rounding). Zero keys contribute nothing, so rows of
    /// different lengths can be batched by left-padding k and v with zeros.
    /// </summary>
    public static Tensor[] FinalStates(Tensor k, Tensor v, IReadOnlyList<Tensor> logGates, IReadOnlyList<Tensor?>? initialStates = null)
    {
        ArgumentNullException.ThrowIfNull(k);
        ArgumentNullException.ThrowIfNull(logGates);
        var (b, hkv, _, _, dk, _) = Validate(k, k, v, logGates, initialStates);
        using var scope = NewDisposeScope();
        var t = k.shape[2];
        var k32 = k.to(ScalarType.Float32);
        var v32 = v.to(ScalarType.Float32);
        var finals = new Tensor[logGates.Count];
        for (var i = 0; i < logGates.Count; i++)
        {
            var inclusive = logGates[i].to(ScalarType.Float32).flip(2).cumsum(2).flip(2);   // Σ_{r≥s} g_r: [B, Hkv, T, dk]
            var exclusive = t == 1
                ? zeros_like(inclusive)
                : cat([inclusive.narrow(2, 1, t - 1), zeros([b, hkv, 1, dk], dtype: ScalarType.Float32, device: k.device)], 2);
            var state = matmul((k32 * exclusive.exp()).transpose(-1, -2), v32);            // [B, Hkv, dk, dv]
            if (initialStates?[i] is { } initial)
            {
                state = state + (inclusive.select(2, 0).exp().unsqueeze(-1) * initial.to(ScalarType.Float32));
            }
            finals[i] = state.MoveToOuterDisposeScope();
        }
        return finals;
    }

    /// <summary>
    /// n chunks at once. q [B, Hkv, n, C, G, dk] (already scaled), k/g [B, Hkv, n, C, dk], v [B, Hkv, n, C, dv], state
    /// [B, Hkv, dk, dv] before the first chunk, future [C, C, 1] (true where j &gt; i).
    /// Returns outputs [B, Hkv, n, C, G, dv] and the state after the last chunk.
    /// </summary>
    private static (Tensor Output, Tensor State) ChunkBlock(Tensor q, Tensor k, Tensor v, Tensor logGate, Tensor state, Tensor future)
    {
        var (b, hkv, n, c, g, dk) = (q.shape[0], q.shape[1], q.shape[2], q.shape[3], q.shape[4], q.shape[5]);
        var cumulative = logGate.cumsum(3);                                             // B_i: [B, Hkv, n, C, dk]

        // Intra-chunk: A_ij = Σ_k q_i[k] k_j[k] exp(B_i[k] − B_j[k]) for j ≤ i.
        var difference = cumulative.unsqueeze(4) - cumulative.unsqueeze(3);             // [B, Hkv, n, C_i, C_j, dk]
        var decay = difference.masked_fill(future, double.NegativeInfinity).exp();      // 0 where j > i
        var keys = decay * k.unsqueeze(3);                                              // [B, Hkv, n, C_i, C_j, dk]
        var scores = matmul(q, keys.transpose(-1, -2));                                 // [B, Hkv, n, C_i, G, C_j]
        var intra = matmul(scores, v.unsqueeze(3));                                     // [B, Hkv, n, C_i, G, dv]

        // State entering each chunk: S_next = diag(exp(B_C)) S + Σ_j (k_j ⊙ exp(B_C − B_j))ᵀ v_j.
        var last = cumulative.select(3, c - 1);                                         // B_C: [B, Hkv, n, dk]
        var added = matmul((k * (last.unsqueeze(3) - cumulative).exp()).transpose(-1, -2), v);   // [B, Hkv, n, dk, dv]
        var carried = last.exp().unsqueeze(-1);                                         // [B, Hkv, n, dk, 1]
        var entering = new Tensor[n];
        for (var chunk = 0; chunk < n; chunk++)
        {
            entering[chunk] = state;
            state = (carried.select(2, chunk) * state) + added.select(2, chunk);
        }
        var before = n == 1 ? entering[0].unsqueeze(2) : stack(entering, 2);           // [B, Hkv, n, dk, dv]

        // Inter-chunk: (q_i ⊙ exp(B_i)) S_before.
        var decayedQueries = (q * cumulative.exp().unsqueeze(4)).reshape(b, hkv, n, c * g, dk);
        var inter = matmul(decayedQueries, before).reshape(b, hkv, n, c, g, -1);          // [B, Hkv, n, C, G, dv]
        return (inter + intra, state);
    }

    /// <summary>Zero-pads the time axis (dim −2) of x by <paramref name="pad"/> positions at the end.</summary>
    private static Tensor PadTime(Tensor x, long pad) => pad == 0 ? x : nn.functional.pad(x, [0, 0, 0, pad]);

    private static Tensor InitialState(IReadOnlyList<Tensor?>? initialStates, int index, long b, long hkv, long dk, long dv, Device device) =>
        initialStates?[index] is { } given ? given.to(ScalarType.Float32) : zeros([b, hkv, dk, dv], dtype: ScalarType.Float32, device: device);

    private static (long B, long Hkv, long Group, long T, long Dk, long Dv) Validate(
        Tensor q, Tensor k, Tensor v, IReadOnlyList<Tensor> logGates, IReadOnlyList<Tensor?>? initialStates)
    {
        if (q.dim() != 4 || k.dim() != 4 || v.dim() != 4)
        {
            throw new ArgumentException($"q, k, v must be 4-D ([B, H, T, d]); got {Shape(q)}, {Shape(k)}, {Shape(v)}.");
        }
        var (b, hq, t, dk) = (q.shape[0], q.shape[1], q.shape[2], q.shape[3]);
        var hkv = k.shape[1];
        var dv = v.shape[3];
        if (k.shape[0] != b || k.shape[2] != t || k.shape[3] != dk || v.shape[0] != b || v.shape[1] != hkv || v.shape[2] != t)
        {
            throw new ArgumentException($"Inconsistent shapes: q {Shape(q)}, k {Shape(k)}, v {Shape(v)}.");
        }
        if (hkv == 0 || hq % hkv != 0)
        {
            throw new ArgumentException($"Query heads ({hq}) must be a multiple of KV heads ({hkv}).");
        }
        if (t == 0)
        {
            throw new ArgumentException("No tokens (T = 0).");
        }
        if (logGates.Count == 0)
        {
            throw new ArgumentException("At least one gate set is required.", nameof(logGates));
        }
        foreach (var gate in logGates)
        {
            if (!gate.shape.SequenceEqual(k.shape))
            {
                throw new ArgumentException($"Log-gate shape {Shape(gate)} must equal k's {Shape(k)}.", nameof(logGates));
            }
        }
        if (initialStates is not null)
        {
            if (initialStates.Count != logGates.Count)
            {
                throw new ArgumentException($"{initialStates.Count} initial states for {logGates.Count} gate sets.", nameof(initialStates));
            }
            foreach (var state in initialStates)
            {
                if (state is not null && !state.shape.SequenceEqual(new[] { b, hkv, dk, dv }))
                {
                    throw new ArgumentException($"Initial state shape {Shape(state)} must be [{b}, {hkv}, {dk}, {dv}].", nameof(initialStates));
                }
            }
        }
        return (b, hkv, hq / hkv, t, dk, dv);
    }

    private static string Shape(Tensor x) => "[" + string.Join(", ", x.shape) + "]";
}

/// <summary>Tensor helpers for the DSLA hot paths.</summary>
internal static class DslaTensorExtensions
{
    /// <summary>The tensor in fp32: itself when it already is (a decode step is made of op launches; skip the no-op ones).</summary>
    public static Tensor Fp32(this Tensor tensor) => tensor.dtype == ScalarType.Float32 ? tensor : tensor.to(ScalarType.Float32);
}

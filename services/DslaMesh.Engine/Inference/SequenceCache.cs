using static TorchSharp.torch;

namespace DslaMesh.Engine.Inference;

/// <summary>What one layer remembers about one sequence: a KV cache for attention, recurrent states for DSLA.</summary>
public interface ILayerState : IDisposable
{
    /// <summary>Device bytes this state holds.</summary>
    long Bytes { get; }
}

/// <summary>
/// A softmax layer's key/value cache for one sequence: K and V [1, Hkv, capacity, hd], the first
/// <see cref="Length"/> positions valid. Keys are stored after RoPE, as HF stores them. Grows by doubling.
/// </summary>
/// <remarks>
/// The storage is either the sequence's own or one row of a <see cref="KvBatch"/> shared with the other rows of a
/// batch, which lets those rows append and attend in one call each. A shared row that outgrows the batch's capacity
/// moves to storage of its own and leaves the batch.
/// </remarks>
public sealed class KvState : ILayerState
{
    private const int MinimumCapacity = 64;
    private Tensor _keys;
    private Tensor _values;

    public KvState(long kvHeads, long headDim, int capacity, ScalarType dtype, Device device)
    {
        capacity = Math.Max(capacity, MinimumCapacity);
        _keys = empty([1, kvHeads, capacity, headDim], dtype: dtype, device: device).DetachFromDisposeScope();
        _values = empty([1, kvHeads, capacity, headDim], dtype: dtype, device: device).DetachFromDisposeScope();
    }

    internal KvState(KvBatch batch, int row)
    {
        Batch = batch;
        Row = row;
        _keys = batch.Keys.narrow(0, row, 1).DetachFromDisposeScope();
        _values = batch.Values.narrow(0, row, 1).DetachFromDisposeScope();
    }

    /// <summary>The batch storage this state is a row of, or null when it owns its storage.</summary>
    public KvBatch? Batch { get; private set; }

    /// <summary>This state's row in <see cref="Batch"/>.</summary>
    public int Row { get; }

    /// <summary>
    /// Counts the first <paramref name="length"/> positions as valid without writing them (benchmarks that need a
    /// cache of a given length, and callers that filled the storage themselves).
    /// </summary>
    public void AssumeFilled(int length)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(length);
        EnsureCapacity(length);
        Length = length;
    }

    internal void Advance(int count) => Length += count;

    /// <summary>Valid positions.</summary>
    public int Length { get; private set; }

    /// <summary>Allocated positions.</summary>
    public long Capacity => _keys.shape[2];

    /// <inheritdoc/>
    public long Bytes => 2 * _keys.NumberOfElements * _keys.ElementSize;

    /// <summary>Bytes the valid positions occupy (what a paged cache would hold).</summary>
    public long UsedBytes => 2 * Length * _keys.shape[1] * _keys.shape[3] * _keys.ElementSize;

    /// <summary>Appends k, v [1, Hkv, T, hd] and returns views of the whole valid cache [1, Hkv, Length, hd].</summary>
    public (Tensor Keys, Tensor Values) Append(Tensor keys, Tensor values)
    {
        var count = (int)keys.shape[2];
        EnsureCapacity(Length + count);
        // Skip the grad-mode switch (three native calls) when gradients are already off, as in generation.
        var grad = is_grad_enabled() ? no_grad() : null;
        using (grad)
        {
            _keys.narrow(2, Length, count).copy_(keys);
            _values.narrow(2, Length, count).copy_(values);
        }
        Length += count;
        return (_keys.narrow(2, 0, Length), _values.narrow(2, 0, Length));
    }

    /// <summary>Views of the valid cache [1, Hkv, Length, hd] (for folding into another layer kind).</summary>
    public (Tensor Keys, Tensor Values) View() => (_keys.narrow(2, 0, Length), _values.narrow(2, 0, Length));

    /// <summary>
    /// The whole storage [1, Hkv, Capacity, hd] after making room for <paramref name="needed"/> positions, for kernels
    /// that write into it themselves (then <see cref="Advance"/>). A batch row that must grow leaves its batch first.
    /// </summary>
    internal (Tensor Keys, Tensor Values) Reserve(int needed)
    {
        EnsureCapacity(needed);
        return (_keys, _values);
    }

    private void EnsureCapacity(int needed)
    {
        if (needed <= Capacity)
        {
            return;
        }
        var capacity = Math.Max(Capacity, MinimumCapacity);
        while (capacity < needed)
        {
            capacity *= 2;
        }
        var shape = new[] { _keys.shape[0], _keys.shape[1], capacity, _keys.shape[3] };
        var keys = empty(shape, dtype: _keys.dtype, device: _keys.device).DetachFromDisposeScope();
        var values = empty(shape, dtype: _values.dtype, device: _values.device).DetachFromDisposeScope();
        using (no_grad())
        {
            keys.narrow(2, 0, Length).copy_(_keys.narrow(2, 0, Length));
            values.narrow(2, 0, Length).copy_(_values.narrow(2, 0, Length));
        }
        _keys.Dispose();
        _values.Dispose();
        _keys = keys;
        _values = values;
        Batch?.Release();
        Batch = null;
    }

    /// <inheritdoc/>
    public void Dispose()
    {
        _keys.Dispose();
        _values.Dispose();
        Batch?.Release();
        Batch = null;
    }
}

/// <summary>
/// One layer's key/value storage for the rows of a batch, [rows, Hkv, capacity, hd] for K and for V. Each row is a
/// <see cref="KvState"/> of one sequence; while the rows of a forward pass are consecutive rows of one batch, at the
/// same length, the layer appends their new keys and values with one copy each and attends with one SDPA call over
/// a view, instead of one of each per row. Freed when the last row is disposed.
/// </summary>
public sealed class KvBatch
{
    private int _references;

    private KvBatch(int rows, long kvHeads, long headDim, int capacity, ScalarType dtype, Device device)
    {
        Keys = empty([rows, kvHeads, capacity, headDim], dtype: dtype, device: device).DetachFromDisposeScope();
        Values = empty([rows, kvHeads, capacity, headDim], dtype: dtype, device: device).DetachFromDisposeScope();
        _references = rows;
    }

    /// <summary>Keys [rows, Hkv, capacity, hd].</summary>
    public Tensor Keys { get; }

    /// <summary>Values [rows, Hkv, capacity, hd].</summary>
    public Tensor Values { get; }

    /// <summary>Positions each row can hold.</summary>
    public long Capacity => Keys.shape[2];

    /// <summary>Allocates storage for <paramref name="rows"/> sequences and returns one state per row.</summary>
    public static KvState[] Allocate(int rows, long kvHeads, long headDim, int capacity, ScalarType dtype, Device device)
    {
        ArgumentOutOfRangeException.ThrowIfLessThan(rows, 1);
        ArgumentOutOfRangeException.ThrowIfLessThan(capacity, 1);
        var batch = new KvBatch(rows, kvHeads, headDim, capacity, dtype, device);
        return Enumerable.Range(0, rows).Select(r => new KvState(batch, r)).ToArray();
    }

    /// <summary>
    /// The batched path of one attention layer: when every row's state for <paramref name="layer"/> is a consecutive
    /// row of one batch at the pass's (uniform) start, or no row has a state yet (a fresh batch is allocated), appends
    /// k, v [B, Hkv, T, hd] and returns views of the valid keys and values [B, Hkv, start + T, hd].
    /// </summary>
    /// <returns>False (nothing written) when the rows do not qualify; the caller then serves them one by one.</returns>
    public static bool TryAppend(IReadOnlyList<SequenceCache> caches, int layer, Models.ForwardContext context, Tensor k, Tensor v,
        [System.Diagnostics.CodeAnalysis.NotNullWhen(true)] out Tensor? keys, [System.Diagnostics.CodeAnalysis.NotNullWhen(true)] out Tensor? values)
    {
        ArgumentNullException.ThrowIfNull(k);
        ArgumentNullException.ThrowIfNull(v);
        keys = null;
        values = null;
        if (!TryRows(caches, layer, context, k, out var rowsK, out var rowsV))
        {
            return false;
        }
        var (start, count) = (context.StartPositions[0], context.TokenCount);
        using (no_grad())
        {
            rowsK.narrow(2, start, count).copy_(k);
            rowsV.narrow(2, start, count).copy_(v);
            keys = rowsK.narrow(2, 0, start + count);
            values = rowsV.narrow(2, 0, start + count);
        }
        Advance(caches, layer, count);
        return true;
    }

    /// <summary>
    /// The qualifying test of <see cref="TryAppend"/> without the append: when the pass's rows are consecutive rows of one
    /// batch at a uniform start with room for the pass's tokens (a fresh batch is allocated when no row has a state yet),
    /// returns the rows' whole storage [B, Hkv, capacity, hd] for a kernel that writes into it; the caller then calls
    /// <see cref="Advance"/>. <paramref name="like"/> [B, Hkv, T, hd] gives the heads, head size, dtype and device.
    /// </summary>
    public static bool TryRows(IReadOnlyList<SequenceCache> caches, int layer, Models.ForwardContext context, Tensor like,
        [System.Diagnostics.CodeAnalysis.NotNullWhen(true)] out Tensor? keys, [System.Diagnostics.CodeAnalysis.NotNullWhen(true)] out Tensor? values)
    {
        ArgumentNullException.ThrowIfNull(caches);
        ArgumentNullException.ThrowIfNull(context);
        ArgumentNullException.ThrowIfNull(like);
        keys = null;
        values = null;
        var rows = caches.Count;
        if (rows < 2 || !context.UniformStart)
        {
            return false;
        }
        var start = context.StartPositions[0];
        var count = context.TokenCount;
        if (caches.All(c => c[layer] is null))
        {
            var capacity = Math.Max(caches.Max(c => c.ExpectedLength), start + count);
            var states = Allocate(rows, like.shape[1], like.shape[3], capacity, like.dtype, like.device);
            for (var i = 0; i < rows; i++)
            {
                states[i].AssumeFilled(start);
                caches[i][layer] = states[i];
            }
        }
        if (caches[0][layer] is not KvState { Batch: { } batch } first || start + count > batch.Capacity)
        {
            return false;
        }
        for (var i = 0; i < rows; i++)
        {
            if (caches[i][layer] is not KvState state || !ReferenceEquals(state.Batch, batch) || state.Row != first.Row + i || state.Length != start)
            {
                return false;
            }
        }
        keys = batch.Keys.narrow(0, first.Row, rows);
        values = batch.Values.narrow(0, first.Row, rows);
        return true;
    }

    /// <summary>Counts <paramref name="count"/> more valid positions in every row's state of <paramref name="layer"/>.</summary>
    public static void Advance(IReadOnlyList<SequenceCache> caches, int layer, int count)
    {
        ArgumentNullException.ThrowIfNull(caches);
        for (var i = 0; i < caches.Count; i++)
        {
            ((KvState)caches[i][layer]!).Advance(count);
        }
    }

    internal void Release()
    {
        if (Interlocked.Decrement(ref _references) == 0)
        {
            Keys.Dispose();
            Values.Dispose();
        }
    }
}

/// <summary>
/// Everything one sequence carries between forward passes: how many tokens it has processed and one
/// <see cref="ILayerState"/> per layer. Owns its tensors; dispose it when the sequence ends.
/// </summary>
public sealed class SequenceCache : IDisposable
{
    private readonly ILayerState?[] _layers;

    public SequenceCache(int layerCount, int expectedLength = 0)
    {
        _layers = new ILayerState?[layerCount];
        ExpectedLength = expectedLength;
    }

    /// <summary>Tokens processed so far (the position of the next token).</summary>
    public int Length { get; private set; }

    /// <summary>Capacity hint for the KV caches this sequence will allocate (prompt + max new tokens).</summary>
    public int ExpectedLength { get; }

    /// <summary>Layer count.</summary>
    public int LayerCount => _layers.Length;

    /// <summary>The state of a layer, or null before the layer first ran for this sequence.</summary>
    public ILayerState? this[int layer]
    {
        get => _layers[layer];
        set
        {
            if (!ReferenceEquals(_layers[layer], value))
            {
                _layers[layer]?.Dispose();
                _layers[layer] = value;
            }
        }
    }

    /// <summary>
    /// Caches for <paramref name="rows"/> sequences whose every layer's KV storage is one <see cref="KvBatch"/> per
    /// layer, so the batch decodes with one append and one attention call per layer.
    /// </summary>
    public static SequenceCache[] AllocateBatch(int rows, int layerCount, long kvHeads, long headDim, int capacity, ScalarType dtype, Device device)
    {
        var caches = Enumerable.Range(0, rows).Select(_ => new SequenceCache(layerCount, capacity)).ToArray();
        for (var layer = 0; layer < layerCount; layer++)
        {
            var states = KvBatch.Allocate(rows, kvHeads, headDim, capacity, dtype, device);
            for (var row = 0; row < rows; row++)
            {
                caches[row][layer] = states[row];
            }
        }
        return caches;
    }

    /// <summary>
    /// Marks <paramref name="length"/> tokens as already processed, with every KV layer counting that many positions as
    /// valid without writing them (benchmarks of decode at a given context).
    /// </summary>
    public void AssumeProcessed(int length)
    {
        foreach (var state in _layers.OfType<KvState>())
        {
            state.AssumeFilled(length);
        }
        Length = length;
    }

    /// <summary>Device bytes held by all layers.</summary>
    public long Bytes => _layers.Sum(l => l?.Bytes ?? 0);

    /// <summary>Called by the model after every layer processed <paramref name="tokens"/> more tokens.</summary>
    public void Advance(int tokens) => Length += tokens;

    /// <inheritdoc/>
    public void Dispose()
    {
        for (var i = 0; i < _layers.Length; i++)
        {
            _layers[i]?.Dispose();
            _layers[i] = null;
        }
    }
}

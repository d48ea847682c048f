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
        using (no_grad())
        {
            _keys.narrow(2, Length, count).copy_(keys);
            _values.narrow(2, Length, count).copy_(values);
        }
        Length += count;
        return (_keys.narrow(2, 0, Length), _values.narrow(2, 0, Length));
    }

    /// <summary>Views of the valid cache [1, Hkv, Length, hd] (for folding into another layer kind).</summary>
    public (Tensor Keys, Tensor Values) View() => (_keys.narrow(2, 0, Length), _values.narrow(2, 0, Length));

    private void EnsureCapacity(int needed)
    {
        if (needed <= Capacity)
        {
            return;
        }
        var capacity = Capacity;
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
    }

    /// <inheritdoc/>
    public void Dispose()
    {
        _keys.Dispose();
        _values.Dispose();
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

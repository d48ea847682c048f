using DslaMesh.Engine.Inference;
using static TorchSharp.torch;

namespace DslaMesh.Engine.Dsla;

/// <summary>
/// What a gated-linear-attention layer remembers about one sequence: one fp32 state [1, Hkv, dk, dv] per gate set —
/// two for DSLA (index 0 history, 1 recency), one for GLA. The states are fixed-size and overwritten in place after every
/// pass (never appended), always fp32 whatever the model dtype, and detached from autograd (gradients never cross
/// passes, as in the reference kernel). Owns its tensors.
/// </summary>
public sealed class DslaState : ILayerState
{
    /// <summary>Index of the history (slow-decay) state.</summary>
    public const int History = 0;

    /// <summary>Index of the recency (fast-decay) state.</summary>
    public const int Recency = 1;

    private readonly Tensor[] _states;

    /// <summary>Zero states: <paramref name="count"/> × [1, Hkv, dk, dv] fp32.</summary>
    public DslaState(int count, long kvHeads, long keyDim, long valueDim, Device device)
    {
        ArgumentOutOfRangeException.ThrowIfLessThan(count, 1);
        _states = new Tensor[count];
        for (var i = 0; i < count; i++)
        {
            _states[i] = zeros([1, kvHeads, keyDim, valueDim], dtype: ScalarType.Float32, device: device).DetachFromDisposeScope();
        }
    }

    /// <summary>States copied from <paramref name="states"/> (each [1, Hkv, dk, dv], any float dtype; stored as fp32).</summary>
    public DslaState(IReadOnlyList<Tensor> states)
    {
        ArgumentNullException.ThrowIfNull(states);
        if (states.Count == 0)
        {
            throw new ArgumentException("At least one state is required.", nameof(states));
        }
        _states = new Tensor[states.Count];
        using (no_grad())
        {
            for (var i = 0; i < states.Count; i++)
            {
                if (states[i].dim() != 4 || states[i].shape[0] != 1)
                {
                    throw new ArgumentException($"State {i} has shape [{string.Join(", ", states[i].shape)}]; expected [1, Hkv, dk, dv].", nameof(states));
                }
                _states[i] = states[i].detach().to(ScalarType.Float32).clone().DetachFromDisposeScope();
            }
        }
    }

    /// <summary>Number of states (2 for DSLA, 1 for GLA).</summary>
    public int Count => _states.Length;

    /// <summary>The states, each [1, Hkv, dk, dv] fp32. Read-only views of the owned tensors: do not dispose them.</summary>
    public IReadOnlyList<Tensor> States => _states;

    /// <summary>The state at <paramref name="index"/> ([1, Hkv, dk, dv] fp32).</summary>
    public Tensor this[int index] => _states[index];

    /// <inheritdoc/>
    public long Bytes => _states.Sum(s => s.NumberOfElements * s.ElementSize);

    /// <summary>Overwrites state <paramref name="index"/> with <paramref name="value"/> [1, Hkv, dk, dv] (detached, cast to fp32).</summary>
    public void Store(int index, Tensor value)
    {
        ArgumentNullException.ThrowIfNull(value);
        if (!value.shape.SequenceEqual(_states[index].shape))
        {
            throw new ArgumentException($"State {index} is [{string.Join(", ", _states[index].shape)}]; got [{string.Join(", ", value.shape)}].", nameof(value));
        }
        using (no_grad())
        {
            _states[index].copy_(value);
        }
    }

    /// <inheritdoc/>
    public void Dispose()
    {
        foreach (var state in _states)
        {
            state.Dispose();
        }
    }
}

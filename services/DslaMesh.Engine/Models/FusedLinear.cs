using DslaMesh.Engine.Backends;
using static TorchSharp.torch;

namespace DslaMesh.Engine.Models;

/// <summary>
/// Several linear maps of the same input stored as one weight [Σout, in], so one matrix product computes them all
/// (Q, K and V; gate and up). Each part is a <see cref="Projection"/> whose weight is a view of the shared storage, so
/// checkpoints still load and save under the Hugging Face names of the parts and no memory is duplicated.
/// </summary>
/// <remarks>
/// Moving a module to another device or dtype after construction replaces the parts' storage; <see cref="IsIntact"/>
/// notices and callers fall back to one product per part. Build models on their device instead.
/// </remarks>
public sealed class FusedLinear : IDisposable
{
    private readonly Tensor _weight;
    private readonly Tensor? _bias;
    private readonly Projection[] _parts;
    private readonly long[] _offsets;

    public FusedLinear(long inFeatures, IReadOnlyList<long> outFeatures, bool bias, ScalarType dtype, Device device)
    {
        ArgumentNullException.ThrowIfNull(outFeatures);
        var total = outFeatures.Sum();
        _weight = empty(total, inFeatures, dtype: dtype, device: device).DetachFromDisposeScope();
        _bias = bias ? zeros(total, dtype: dtype, device: device).DetachFromDisposeScope() : null;
        _parts = new Projection[outFeatures.Count];
        _offsets = new long[outFeatures.Count];
        long offset = 0;
        for (var i = 0; i < outFeatures.Count; i++)
        {
            _offsets[i] = offset;
            _parts[i] = new Projection(
                _weight.narrow(0, offset, outFeatures[i]).DetachFromDisposeScope(),
                _bias?.narrow(0, offset, outFeatures[i]).DetachFromDisposeScope());
            offset += outFeatures[i];
        }
        OutFeatures = total;
    }

    /// <summary>Σout.</summary>
    public long OutFeatures { get; }

    /// <summary>The shared weight [Σout, in].</summary>
    public Tensor Weight => _weight;

    /// <summary>The shared bias [Σout], or null.</summary>
    public Tensor? Bias => _bias;

    /// <summary>The parts, in order.</summary>
    public IReadOnlyList<Projection> Parts => _parts;

    /// <summary>
    /// x [..., in] → [..., Σout]: every part in one product. The parts are the parameters (optimisers and checkpoints see
    /// them) and the shared weight is not, so when a part needs a gradient the product goes through the parts instead,
    /// one per part, and autograd reaches them; otherwise they would never be trained.
    /// </summary>
    public Tensor Forward(Tensor x)
    {
        if (!NeedsGradient)
        {
            return nn.functional.linear(x, _weight, _bias);
        }
        using var scope = NewDisposeScope();
        return cat(_parts.Select(p => p.forward(x)).ToArray(), -1).MoveToOuterDisposeScope();
    }

    /// <summary>Whether gradients are on and some part's weight or bias requires one.</summary>
    private bool NeedsGradient => is_grad_enabled() && _parts.Any(p => p.Weight.requires_grad || p.Bias?.requires_grad == true);

    /// <summary>
    /// Whether every part still views the shared storage (host metadata only, no device sync). True when it cannot be
    /// checked, which only happens with a LibTorch older than the stable C shim.
    /// </summary>
    public bool IsIntact()
    {
        if (AtenShim.DataPointer(_weight) is not { } basePointer)
        {
            return true;
        }
        var rowBytes = _weight.shape[1] * _weight.ElementSize;
        for (var i = 0; i < _parts.Length; i++)
        {
            if (AtenShim.DataPointer(_parts[i].Weight) != basePointer + (nint)(_offsets[i] * rowBytes))
            {
                return false;
            }
        }
        return true;
    }

    /// <inheritdoc/>
    public void Dispose()
    {
        _weight.Dispose();
        _bias?.Dispose();
    }
}

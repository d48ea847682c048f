using TorchSharp.Modules;
using TorchSharp.Utils;
using static TorchSharp.torch;

namespace DslaMesh.Engine.Models;

/// <summary>
/// A bias-optional linear map whose weight [out, in] is allocated uninitialised, to be filled from a checkpoint or a
/// seeded initialiser (nn.Linear would spend minutes on Kaiming init for a 7B model before overwriting it).
/// </summary>
public sealed class Projection : nn.Module<Tensor, Tensor>
{
    [ComponentName(Name = "weight")]
    private readonly Parameter _weight;
    [ComponentName(Name = "bias")]
    private readonly Parameter? _bias;
    private Tensor? _transposed;
    private nint _transposedFor;

    public Projection(long inFeatures, long outFeatures, bool bias, ScalarType dtype, Device device) : base("Linear")
    {
        _weight = new Parameter(empty(outFeatures, inFeatures, dtype: dtype, device: device), requires_grad: false);
        _bias = bias ? new Parameter(zeros(outFeatures, dtype: dtype, device: device), requires_grad: false) : null;
        InFeatures = inFeatures;
        OutFeatures = outFeatures;
        RegisterComponents();
    }

    /// <summary>Wraps existing storage (views of a <see cref="FusedLinear"/>): weight [out, in], bias [out] or null.</summary>
    public Projection(Tensor weight, Tensor? bias) : base("Linear")
    {
        ArgumentNullException.ThrowIfNull(weight);
        InFeatures = weight.shape[1];
        OutFeatures = weight.shape[0];
        _weight = new Parameter(weight, requires_grad: false);
        _bias = bias is null ? null : new Parameter(bias, requires_grad: false);
        RegisterComponents();
    }

    public long InFeatures { get; }
    public long OutFeatures { get; }

    /// <summary>Weight [out, in].</summary>
    public Parameter Weight => _weight;

    /// <summary>Bias [out], if any.</summary>
    public Parameter? Bias => _bias;

    /// <summary>
    /// The weight transposed, [in, out]: a view kept between calls for in-place GEMMs (<c>addmm_</c>), rebuilt if the
    /// parameter's tensor is replaced.
    /// </summary>
    public Tensor WeightTransposed
    {
        get
        {
            if (_transposed is null || _transposedFor != _weight.Handle)
            {
                _transposed?.Dispose();
                _transposed = _weight.t().DetachFromDisposeScope();
                _transposedFor = _weight.Handle;
            }
            return _transposed;
        }
    }

    /// <inheritdoc/>
    protected override void Dispose(bool disposing)
    {
        if (disposing)
        {
            _transposed?.Dispose();
            _transposed = null;
        }
        base.Dispose(disposing);
    }

    /// <summary>x [..., in] → [..., out].</summary>
    public override Tensor forward(Tensor x) => nn.functional.linear(x, _weight, _bias);
}

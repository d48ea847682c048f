using TorchSharp.Modules;
using TorchSharp.Utils;
using static TorchSharp.torch;

namespace DslaMesh.Engine.Models;

/// <summary>Root-mean-square layer norm as Llama computes it: statistics in fp32, result cast back, then scaled.</summary>
public sealed class RmsNorm : nn.Module<Tensor, Tensor>
{
    [ComponentName(Name = "weight")]
    private readonly Parameter _weight;
    private readonly double _eps;

    public RmsNorm(long size, double eps, ScalarType dtype, Device device) : base("RMSNorm")
    {
        _weight = new Parameter(ones(size, dtype: dtype, device: device), requires_grad: false);
        _eps = eps;
        RegisterComponents();
    }

    /// <summary>The scale vector [D].</summary>
    public Parameter Weight => _weight;

    /// <summary>x [..., D] → [..., D] in x's dtype.</summary>
    public override Tensor forward(Tensor x)
    {
        using var scope = NewDisposeScope();
        var x32 = x.to(ScalarType.Float32);
        var normed = x32 * (x32.pow(2).mean([-1], keepdim: true) + _eps).rsqrt();
        return (_weight * normed.to(x.dtype)).MoveToOuterDisposeScope();
    }
}

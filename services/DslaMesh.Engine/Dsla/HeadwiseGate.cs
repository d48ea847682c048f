using TorchSharp.Modules;
using TorchSharp.Utils;
using static TorchSharp.torch;

namespace DslaMesh.Engine.Dsla;

/// <summary>
/// A per-KV-head linear map of the key, the foldable layer's gate pre-activation: z[b, h, t] = k[b, h, t] W[h] + bias[h],
/// computed in fp32. weight [Hkv, hd, hd] (input dim first), bias [Hkv, hd].
/// </summary>
public sealed class HeadwiseGate : nn.Module<Tensor, Tensor>
{
    [ComponentName(Name = "weight")]
    private readonly Parameter _weight;
    [ComponentName(Name = "bias")]
    private readonly Parameter _bias;

    public HeadwiseGate(long heads, long dim, ScalarType dtype, Device device) : base("HeadwiseGate")
    {
        _weight = new Parameter(empty(heads, dim, dim, dtype: dtype, device: device), requires_grad: false);
        _bias = new Parameter(zeros(heads, dim, dtype: dtype, device: device), requires_grad: false);
        RegisterComponents();
    }

    /// <summary>Weight [Hkv, hd, hd].</summary>
    public Parameter Weight => _weight;

    /// <summary>Bias [Hkv, hd].</summary>
    public Parameter Bias => _bias;

    /// <summary>k [B, Hkv, T, hd] (any dtype) → z [B, Hkv, T, hd] fp32.</summary>
    public override Tensor forward(Tensor k)
    {
        using var scope = NewDisposeScope();
        var z = matmul(k.Fp32(), _weight.Fp32()) + _bias.Fp32().unsqueeze(1);
        return z.MoveToOuterDisposeScope();
    }

    /// <summary>
    /// Both gates of a layer on the same keys in one batched matmul (their weights side by side), and their log-gates
    /// in one pass: a decode step is made of op launches, and this is half of the gates' (k [B, Hkv, T, hd] →
    /// two fp32 log-gates [B, Hkv, T, hd]).
    /// </summary>
    public static (Tensor First, Tensor Second) LogGates(HeadwiseGate first, HeadwiseGate second, Tensor k)
    {
        ArgumentNullException.ThrowIfNull(first);
        ArgumentNullException.ThrowIfNull(second);
        ArgumentNullException.ThrowIfNull(k);
        using var scope = NewDisposeScope();
        var weights = cat([first._weight.Fp32(), second._weight.Fp32()], -1);           // [Hkv, hd, 2hd]
        var biases = cat([first._bias.Fp32(), second._bias.Fp32()], -1).unsqueeze(1);   // [Hkv, 1, 2hd]
        var both = GatedLinearMixer.LogGate(matmul(k.Fp32(), weights) + biases);        // [B, Hkv, T, 2hd]
        var halves = both.chunk(2, -1);
        return (halves[0].MoveToOuterDisposeScope(), halves[1].MoveToOuterDisposeScope());
    }

    /// <summary>W[h] = I, bias = 0 (call under no_grad).</summary>
    public void InitializeIdentity()
    {
        using var scope = NewDisposeScope();
        _weight.copy_(eye(_weight.shape[1], dtype: _weight.dtype, device: _weight.device).expand(_weight.shape));
        _bias.zero_();
    }

    /// <summary>W ~ U(±1/√hd), bias = 0 (call under no_grad).</summary>
    public void InitializeUniform(Generator generator)
    {
        var bound = 1.0 / Math.Sqrt(_weight.shape[1]);
        Init.Uniform(_weight, -bound, bound, generator);
        _bias.zero_();
    }
}

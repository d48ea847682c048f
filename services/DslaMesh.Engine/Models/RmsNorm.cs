using TorchSharp.Modules;
using TorchSharp.Utils;
using static TorchSharp.torch;

namespace DslaMesh.Engine.Models;

/// <summary>Root-mean-square layer norm as Llama computes it: statistics in fp32, result cast back, then scaled.</summary>
/// <remarks>
/// With gradients off: on CUDA with <c>kernel</c> set, up to <see cref="Kernels.RmsNormKernel.MaxRows"/> rows (decode),
/// the engine's own kernel (<see cref="Kernels.RmsNormKernel"/>: one short launch, Hugging Face's rounding); else with <c>fused</c> set, LibTorch's fused kernel through
/// <see cref="Backends.AtenShim"/>: one launch instead of eight, computing in fp32 and rounding once where Hugging Face
/// rounds twice (before and after the scale), so bf16 outputs can differ in the last bit; fp32 results agree to rounding.
/// </remarks>
public sealed class RmsNorm : nn.Module<Tensor, Tensor>
{
    [ComponentName(Name = "weight")]
    private readonly Parameter _weight;
    private readonly double _eps;
    private readonly bool _fused;
    private readonly bool _kernel;
    private readonly long _size;

    /// <summary>
    /// A norm over the last dimension of <paramref name="size"/>. <paramref name="fused"/>: LibTorch's fused kernel when
    /// gradients are off; <paramref name="kernel"/>: the engine's kernel for decode rows on CUDA;
    /// <paramref name="intoProjections"/>: let the decode GEMV kernel apply it to the input of the product that follows
    /// (<see cref="FusesIntoProjections"/>; CUDA only).
    /// </summary>
    public RmsNorm(long size, double eps, ScalarType dtype, Device device, bool fused = true, bool kernel = false, bool intoProjections = false) : base("RMSNorm")
    {
        ArgumentNullException.ThrowIfNull(device);
        _fused = fused;
        FusesIntoProjections = intoProjections && device.type == TorchSharp.DeviceType.CUDA && eps > 0;
        // Decided once: the kernel serves this dtype, device and width or it does not.
        _kernel = kernel && Kernels.RmsNormKernel.Unsupported(dtype, device.type, size) is null;
        _size = size;
        _weight = new Parameter(ones(size, dtype: dtype, device: device), requires_grad: false);
        _eps = eps;
        RegisterComponents();
    }

    /// <summary>Whether this norm runs the engine's kernel (up to <see cref="Kernels.RmsNormKernel.MaxRows"/> rows, gradients off).</summary>
    public bool UsesKernel => _kernel;

    /// <summary>The scale vector [D].</summary>
    public Parameter Weight => _weight;

    /// <summary>The epsilon added to the mean square.</summary>
    public double Eps => _eps;

    /// <summary>
    /// Whether a following decode product may take this norm's input unnormalised and normalise it inside its GEMV
    /// launch (<see cref="Kernels.DecodeGemv"/>'s norm variant); the product falls back to <see cref="forward"/> first
    /// where the kernel does not serve it.
    /// </summary>
    public bool FusesIntoProjections { get; }

    /// <summary>x [..., D] → [..., D] in x's dtype.</summary>
    public override Tensor forward(Tensor x)
    {
        ArgumentNullException.ThrowIfNull(x);
        if (_kernel && !is_grad_enabled() && x.is_contiguous() && x.NumberOfElements <= Kernels.RmsNormKernel.MaxRows * _size)
        {
            return Kernels.RmsNormKernel.Run(x, _weight, _eps);
        }
        if (_fused && !is_grad_enabled() && Backends.AtenShim.TryFusedRmsNorm(x, _weight, _eps, out var fused, _size))
        {
            return fused;
        }
        return Kernels.RmsNormKernel.Reference(x, _weight, _eps);
    }
}

using DslaMesh.Engine.Kernels;
using static TorchSharp.torch;

namespace DslaMesh.Engine.Models;

/// <summary>
/// The projections of a decode step through <see cref="DecodeGemv"/> where it serves them (CUDA, no gradients, no bias,
/// at most <see cref="DecodeGemv.MaxRows"/> rows, a switch on), else nothing: each caller keeps its LibTorch path.
/// </summary>
internal static class DecodeProducts
{
    private static bool Serves(bool enabled, Tensor x, Tensor weight, Tensor? bias) =>
        enabled && bias is null && x.device_type == TorchSharp.DeviceType.CUDA && !is_grad_enabled() && DecodeGemv.Unsupported(x, weight) is null;

    /// <summary>x [..., K] · Wᵀ → [..., N], or null when the kernel does not serve it.</summary>
    public static Tensor? Product(bool enabled, Tensor x, Tensor weight, Tensor? bias)
    {
        if (!Serves(enabled, x, weight, bias))
        {
            return null;
        }
        var shape = x.shape;
        shape[^1] = weight.shape[0];
        var output = empty(shape, dtype: x.dtype, device: x.device);
        DecodeGemv.Run(x, weight, output, GemvEpilogue.Store);
        return output;
    }

    /// <summary>silu(x·W_gᵀ) ⊙ x·W_uᵀ → [..., N] for W = [W_g; W_u] [2N, K], or null when the kernel does not serve it.</summary>
    public static Tensor? GatedProduct(bool enabled, Tensor x, Tensor weight, Tensor? bias)
    {
        if (!Serves(enabled, x, weight, bias))
        {
            return null;
        }
        var shape = x.shape;
        shape[^1] = weight.shape[0] / 2;
        var output = empty(shape, dtype: x.dtype, device: x.device);
        DecodeGemv.Run(x, weight, output, GemvEpilogue.SiluGate);
        return output;
    }

    /// <summary>residual [M, N] += x [M, K] · Wᵀ in place; false (nothing done) when the kernel does not serve it.</summary>
    public static bool AddInto(bool enabled, Tensor residual, Tensor x, Tensor weight)
    {
        if (!Serves(enabled, x, weight, null))
        {
            return false;
        }
        DecodeGemv.Run(x, weight, residual, GemvEpilogue.AddInto);
        return true;
    }
}

using DslaMesh.Engine.Kernels;
using static TorchSharp.torch;

namespace DslaMesh.Engine.Models;

/// <summary>
/// The projections of a decode step through <see cref="DecodeGemv"/> where it serves them and beats cuBLAS (CUDA, no
/// gradients, no bias, few rows, a switch on), else nothing: each caller keeps its LibTorch path.
/// </summary>
/// <remarks>
/// Row limits from the kernel against cuBLAS on an NVIDIA H200 (bf16, Llama-2-7B shapes, GPU time in CUDA graphs,
/// 2026-12-02): the SiLU-gated gate/up product wins up to 4 rows (45.5 vs 51.9 µs at 1 row; it also saves the
/// element-wise kernels), the residual-adding o/down products and the LM head up to 2 rows (o 11.1 vs 13.4 µs, down
/// 24.8 vs 27.3, LM head 61.9 vs 64.7 at 1 row); from 8 rows cuBLAS wins everywhere (gate/up 77.5 vs 54.4 µs), and on
/// the Q/K/V shape (12288 × 4096) at every row count (29.8 vs 27.4 µs), so Q/K/V always stays on cuBLAS.
/// </remarks>
internal static class DecodeProducts
{
    /// <summary>Most rows for which the plain and residual-adding products use the kernel.</summary>
    public const int ProductRows = 2;

    /// <summary>Most rows for which the SiLU-gated product uses the kernel.</summary>
    public const int GatedRows = 4;

    private static bool Serves(bool enabled, Tensor x, Tensor weight, Tensor? bias, int maxRows) =>
        enabled && bias is null && x.device_type == TorchSharp.DeviceType.CUDA && !is_grad_enabled()
        && x.NumberOfElements <= maxRows * x.shape[^1] && DecodeGemv.Unsupported(x, weight) is null;

    /// <summary>x [..., K] · Wᵀ → [..., N], or null when the kernel does not serve it.</summary>
    public static Tensor? Product(bool enabled, Tensor x, Tensor weight, Tensor? bias)
    {
        if (!Serves(enabled, x, weight, bias, ProductRows))
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
        if (!Serves(enabled, x, weight, bias, GatedRows))
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
        if (!Serves(enabled, x, weight, null, ProductRows))
        {
            return false;
        }
        DecodeGemv.Run(x, weight, residual, GemvEpilogue.AddInto);
        return true;
    }
}

using DslaMesh.Engine.Kernels;
using static TorchSharp.torch;

namespace DslaMesh.Engine.Models;

/// <summary>
/// The projections of a decode step through <see cref="DecodeGemv"/> where it serves them and beats cuBLAS (CUDA, no
/// gradients, no bias, few rows, a switch on), else nothing: each caller keeps its LibTorch path. A product given the
/// RMS norm in front of it normalises its input in the same launch (<see cref="LlamaKernelOptions.NormIntoProjections"/>).
/// </summary>
/// <remarks>
/// Row limits from the kernel against cuBLAS on an NVIDIA H200 (bf16, Llama-2-7B shapes, GPU time in CUDA graphs,
/// 2026-12-02): the SiLU-gated gate/up product wins up to 4 rows (45.5 vs 51.9 µs at 1 row; it also saves the
/// element-wise kernels), the residual-adding o/down products and the LM head up to 2 rows (o 11.1 vs 13.4 µs, down
/// 24.8 vs 27.3, LM head 61.9 vs 64.7 at 1 row); from 8 rows cuBLAS wins everywhere (gate/up 77.5 vs 54.4 µs), and on
/// the Q/K/V shape (12288 × 4096) at every row count (29.8 vs 27.4 µs), so Q/K/V stays on cuBLAS unless the norm in
/// front of it fuses into the GEMV (which then saves the norm's own launch, ~4 µs in a graph).
/// </remarks>
internal static class DecodeProducts
{
    /// <summary>Most rows for which the plain and residual-adding products use the kernel.</summary>
    public const int ProductRows = 2;

    /// <summary>Most rows for which the SiLU-gated product uses the kernel.</summary>
    public const int GatedRows = 4;

    private static bool Serves(bool enabled, Tensor x, Tensor weight, Tensor? bias, int maxRows, RmsNorm? norm) =>
        enabled && bias is null && x.device_type == TorchSharp.DeviceType.CUDA && !is_grad_enabled()
        && (norm is null || (norm.FusesIntoProjections && norm.Weight.shape[0] == x.shape[^1]))
        && x.NumberOfElements <= maxRows * x.shape[^1] && DecodeGemv.Unsupported(x, weight) is null;

    /// <summary>
    /// x [..., K] · Wᵀ → [..., N], or null when the kernel does not serve it. With <paramref name="norm"/>, x is its
    /// unnormalised input and the kernel normalises it (null unless the norm <see cref="RmsNorm.FusesIntoProjections"/>).
    /// </summary>
    public static Tensor? Product(bool enabled, Tensor x, Tensor weight, Tensor? bias, RmsNorm? norm = null) =>
        Run(enabled, x, weight, bias, norm, ProductRows, GemvEpilogue.Store, weight.shape[0]);

    /// <summary>
    /// silu(x·W_gᵀ) ⊙ x·W_uᵀ → [..., N] for W = [W_g; W_u] [2N, K], or null when the kernel does not serve it;
    /// <paramref name="norm"/> as for <see cref="Product"/>.
    /// </summary>
    public static Tensor? GatedProduct(bool enabled, Tensor x, Tensor weight, Tensor? bias, RmsNorm? norm = null) =>
        Run(enabled, x, weight, bias, norm, GatedRows, GemvEpilogue.SiluGate, weight.shape[0] / 2);

    private static Tensor? Run(bool enabled, Tensor x, Tensor weight, Tensor? bias, RmsNorm? norm, int maxRows, GemvEpilogue epilogue, long outputs)
    {
        if (!Serves(enabled, x, weight, bias, maxRows, norm))
        {
            return null;
        }
        var shape = x.shape;
        shape[^1] = outputs;
        var output = empty(shape, dtype: x.dtype, device: x.device);
        DecodeGemv.Run(x, weight, output, epilogue, norm is null ? null : (norm.Weight, norm.Eps));
        return output;
    }

    /// <summary>residual [M, N] += x [M, K] · Wᵀ in place; false (nothing done) when the kernel does not serve it.</summary>
    public static bool AddInto(bool enabled, Tensor residual, Tensor x, Tensor weight)
    {
        if (!Serves(enabled, x, weight, null, ProductRows, norm: null))
        {
            return false;
        }
        DecodeGemv.Run(x, weight, residual, GemvEpilogue.AddInto);
        return true;
    }
}

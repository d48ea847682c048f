using static TorchSharp.torch;

namespace DslaMesh.Engine.Models;

/// <summary>
/// How a <see cref="LlamaForCausalLM"/> lays out its weights and which fused kernels it uses. The defaults are the fast
/// path; turning them off gives the plain one-op-per-step form (for before/after measurements and debugging).
/// </summary>
public sealed record LlamaKernelOptions
{
    /// <summary>The fast path.</summary>
    public static LlamaKernelOptions Default { get; } = new();

    /// <summary>The plain path: separate Q/K/V and gate/up products, composite RMS norm, KV copies, SDPA and LibTorch GEMMs in decode.</summary>
    public static LlamaKernelOptions Plain { get; } = new() { FuseProjections = false, FusedRmsNorm = false, RmsNormKernel = false, NormIntoProjections = false, DecodeGraphs = DecodeGraphMode.Off, DecodeAttentionKernel = false, DecodeGemvKernel = false };

    /// <summary>Store Q/K/V and gate/up as one weight each and run them as one product (HF names still load).</summary>
    public bool FuseProjections { get; init; } = true;

    /// <summary>Use LibTorch's fused RMS norm kernel when gradients are off.</summary>
    public bool FusedRmsNorm { get; init; } = true;

    /// <summary>
    /// On CUDA, run RMS norms (gradients off) as the engine's runtime-compiled kernel (<see cref="Kernels.RmsNormKernel"/>)
    /// where it supports the width; elsewhere, or when off, <see cref="FusedRmsNorm"/> decides.
    /// </summary>
    public bool RmsNormKernel { get; init; } = true;

    /// <summary>
    /// On CUDA, run each decode step's attention core (KV append and attention over the cache) as the engine's own
    /// runtime-compiled kernel (<see cref="Kernels.DecodeAttention"/>) where it supports the shapes; elsewhere, or when
    /// off, KV copies and SDPA.
    /// </summary>
    public bool DecodeAttentionKernel { get; init; } = true;

    /// <summary>
    /// On CUDA, run the projections of decode steps with at most <see cref="Kernels.DecodeGemv.MaxRows"/> rows as the
    /// engine's runtime-compiled GEMV kernel (<see cref="Kernels.DecodeGemv"/>: residual add and SiLU gate fused); else
    /// LibTorch's GEMM.
    /// </summary>
    public bool DecodeGemvKernel { get; init; } = true;

    /// <summary>
    /// On CUDA with <see cref="DecodeGemvKernel"/>, apply the RMS norm in front of a decode step's Q/K/V, gate/up and LM
    /// head products inside the GEMV kernel's launch (its <c>NORM</c> variant) instead of as a launch of its own, and
    /// run Q/K/V through the GEMV kernel then (cuBLAS otherwise). Off by default: not yet measured on a GPU (bench
    /// engine <c>--norm-into-projections</c> turns it on).
    /// </summary>
    public bool NormIntoProjections { get; init; }

    /// <summary>How decode steps run (see <see cref="DecodeGraphMode"/>).</summary>
    public DecodeGraphMode DecodeGraphs { get; init; } = DecodeGraphMode.Auto;

    /// <summary>
    /// These options as a model on <paramref name="device"/> uses them: the CUDA-only kernels off elsewhere, and
    /// <see cref="NormIntoProjections"/> off without the GEMV kernel it runs in.
    /// </summary>
    public LlamaKernelOptions On(Device device)
    {
        ArgumentNullException.ThrowIfNull(device);
        var options = device.type == TorchSharp.DeviceType.CUDA || (!DecodeAttentionKernel && !DecodeGemvKernel && !RmsNormKernel && !NormIntoProjections)
            ? this
            : this with { DecodeAttentionKernel = false, DecodeGemvKernel = false, RmsNormKernel = false, NormIntoProjections = false };
        return options.NormIntoProjections && !options.DecodeGemvKernel ? options with { NormIntoProjections = false } : options;
    }
}

/// <summary>How a decode step (one new token per row, every layer softmax attention) runs.</summary>
public enum DecodeGraphMode
{
    /// <summary>CUDA graphs on CUDA when LibTorch exports them; op by op elsewhere.</summary>
    Auto,

    /// <summary>Op by op, as prefill runs.</summary>
    Off,

    /// <summary>
    /// The graph segments run op by op without capture (on any device): the same work in the same order as the graphs,
    /// which tests compare with <see cref="Off"/> on CPU.
    /// </summary>
    Segmented,
}

using System.ComponentModel.DataAnnotations;

namespace DslaMesh.Engine.Backends;

/// <summary>Which device the engine runs on and where its LibTorch comes from.</summary>
public sealed class TorchBackendOptions
{
    /// <summary>Configuration section name.</summary>
    public const string SectionName = "TorchBackend";

    /// <summary>
    /// <c>cpu</c>, <c>cuda</c> or <c>cuda:N</c>.
    /// </summary>
    /// <remarks>Default value is <c>cpu</c>.</remarks>
    [Required]
    [RegularExpression("^(cpu|cuda(:[0-9]+)?)$", ErrorMessage = "Device must be 'cpu', 'cuda' or 'cuda:N'.")]
    public string Device { get; set; } = "cpu";

    /// <summary>
    /// Folder holding a CUDA LibTorch (<c>libtorch_cuda.so</c> and its neighbours), such as PyTorch's
    /// <c>site-packages/torch/lib</c>.
    /// </summary>
    /// <remarks>Default: discovered by asking the host's <c>python3</c> where <c>torch</c> lives. Unused on CPU.</remarks>
    public string? LibTorchDirectory { get; set; }

    /// <summary>Weights and activations dtype: <c>float32</c>, <c>bfloat16</c> or <c>float16</c>.</summary>
    /// <remarks>Default: <c>float32</c> on CPU, <c>bfloat16</c> on CUDA.</remarks>
    [RegularExpression("^(float32|bfloat16|float16)$", ErrorMessage = "DType must be float32, bfloat16 or float16.")]
    public string? DType { get; set; }

    /// <summary>CPU threads for LibTorch's intra-op pool; 0 keeps LibTorch's default.</summary>
    [Range(0, 1024)]
    public int CpuThreads { get; set; }

    /// <summary>
    /// Let scaled-dot-product attention use cuDNN on CUDA. Off by default: cuDNN plans per sequence length, which costs
    /// milliseconds on every decode step (see <see cref="AtenShim.SetCudnnAttention"/>); FlashAttention serves instead.
    /// </summary>
    public bool CudnnAttention { get; set; }

    /// <summary>
    /// Replay decode steps as CUDA graphs on CUDA (<see cref="Models.DecodeGraphMode.Auto"/>); off runs every op from
    /// the host. Default: on.
    /// </summary>
    public bool CudaGraphs { get; set; } = true;

    /// <summary>
    /// Run decode steps' attention core and projections, and RMS norms, as the engine's runtime-compiled CUDA kernels on
    /// CUDA (<see cref="Kernels.DecodeAttention"/>, <see cref="Kernels.DecodeGemv"/>, <see cref="Kernels.RmsNormKernel"/>);
    /// off uses KV copies, SDPA, LibTorch's GEMMs and its fused norm. Default: on.
    /// </summary>
    public bool DecodeKernels { get; set; } = true;

    /// <summary>
    /// With <see cref="DecodeKernels"/>, apply decode steps' RMS norms inside the GEMV launch of the product after each
    /// (<see cref="Models.LlamaKernelOptions.NormIntoProjections"/>). Default: off (not yet measured on a GPU).
    /// </summary>
    public bool NormIntoProjections { get; set; }

    /// <summary>The model kernels these options ask for.</summary>
    public Models.LlamaKernelOptions Kernels => Models.LlamaKernelOptions.Default with
    {
        DecodeGraphs = CudaGraphs ? Models.DecodeGraphMode.Auto : Models.DecodeGraphMode.Off,
        DecodeAttentionKernel = DecodeKernels,
        DecodeGemvKernel = DecodeKernels,
        RmsNormKernel = DecodeKernels,
        NormIntoProjections = NormIntoProjections,   // off with DecodeKernels: LlamaKernelOptions.On drops it without the GEMV kernel
    };

    /// <summary>Whether the device is a CUDA device.</summary>
    public bool IsCuda => Device.StartsWith("cuda", StringComparison.Ordinal);
}

using System.Globalization;
using static TorchSharp.torch;

namespace DslaMesh.Engine.Kernels;

/// <summary>What <see cref="DecodeGemv"/> does with the product x·Wᵀ.</summary>
public enum GemvEpilogue
{
    /// <summary>y = x·Wᵀ.</summary>
    Store = 0,

    /// <summary>y += x·Wᵀ (the residual add of an output or down projection, in place).</summary>
    AddInto = 1,

    /// <summary>y = silu(x·W_gᵀ) ⊙ x·W_uᵀ for W = [W_g; W_u] (Llama's gate/up pair stacked as one weight [2N, K]).</summary>
    SiluGate = 2,
}

/// <summary>
/// Matrix-vector products for decode steps of up to <see cref="MaxRows"/> rows (<c>decode_gemv.cu</c>): each weight row
/// is read once for all rows with streaming 16-byte loads, and the residual add or the SiLU gate is applied on the
/// way out, so a decode step's projections cost one launch each and no separate element-wise kernels.
/// </summary>
/// <remarks>
/// Shapes: x [M, K] (rows any stride apart, contiguous within), W [N, K] contiguous (or [2N, K] for
/// <see cref="GemvEpilogue.SiluGate"/>), y [M, N] (rows any stride apart), and for a fused norm its weight [K]. Launched
/// on LibTorch's current stream, so it can be captured into a CUDA graph like any LibTorch kernel. Callers fall back to
/// LibTorch when <see cref="Unsupported"/> names a reason.
/// </remarks>
public static unsafe class DecodeGemv
{
    /// <summary>Most rows of x one launch serves.</summary>
    public const int MaxRows = 8;

    private const string Source = "decode_gemv.cu";
    private const int OutputsPerBlock = 8 * 2;   // WARPS × OUTPUTS_PER_WARP in the source

    private static readonly System.Collections.Concurrent.ConcurrentDictionary<(int Rows, GemvEpilogue Epilogue, bool Norm, ScalarType DType, int Device), nint> Compiled = new();

    /// <summary>Why the kernel cannot compute x·Wᵀ (null when it can).</summary>
    public static string? Unsupported(Tensor x, Tensor weight)
    {
        ArgumentNullException.ThrowIfNull(x);
        ArgumentNullException.ThrowIfNull(weight);
        if (CudaKernels.UnavailableOn(x.device_type) is { } unavailable)
        {
            return unavailable;
        }
        if (x.dtype is not (ScalarType.BFloat16 or ScalarType.Float16 or ScalarType.Float32) || weight.dtype != x.dtype)
        {
            return $"dtypes {x.dtype} and {weight.dtype}";
        }
        var k = weight.shape[^1];
        if (x.dim() < 1 || x.shape[^1] != k || weight.dim() != 2 || !weight.is_contiguous() || k * x.ElementSize % 16 != 0)
        {
            return $"x {CudaKernels.Shape(x)} and W {CudaKernels.Shape(weight)}";
        }
        var rows = x.NumberOfElements / k;
        return rows is < 1 or > MaxRows ? $"{rows} rows" : null;
    }

    /// <summary>
    /// Computes x [M, K] · Wᵀ into <paramref name="output"/> [M, N] as <paramref name="epilogue"/> says. Tensors of more
    /// dimensions are taken as [M, K] / [M, N] over their last dimension (each must view that way). With
    /// <paramref name="norm"/>, x is first normalised as <see cref="RmsNormKernel"/> would (its weight [K] and epsilon),
    /// inside the same launch.
    /// </summary>
    /// <exception cref="ArgumentException">Unsupported operands, or shapes that do not fit (the message says which).</exception>
    public static void Run(Tensor x, Tensor weight, Tensor output, GemvEpilogue epilogue, (Tensor Weight, double Eps)? norm = null)
    {
        ArgumentNullException.ThrowIfNull(output);
        if (Unsupported(x, weight) is { } reason)
        {
            throw new ArgumentException($"The decode GEMV kernel does not support these operands: {reason}.", nameof(x));
        }
        var k = weight.shape[1];
        if (norm is (var gains, var eps) && (!RmsNormKernel.IsWeightFor(gains, x, k) || CudaKernels.DataPointer(gains) % 16 != 0 || !(eps > 0)))
        {
            throw new ArgumentException($"The norm weight must be a contiguous, 16-byte aligned [{k}] {x.dtype} tensor on {x.device} with a positive epsilon (got {CudaKernels.Shape(gains)} {gains.dtype} on {gains.device}, eps {eps}).", nameof(norm));
        }
        var n = epilogue == GemvEpilogue.SiluGate ? weight.shape[0] / 2 : weight.shape[0];
        var rows = x.NumberOfElements / k;
        if ((epilogue == GemvEpilogue.SiluGate && weight.shape[0] % 2 != 0) || output.NumberOfElements != rows * n || output.dtype != x.dtype
            || output.shape[^1] != n || output.stride(-1) != 1 || x.stride(-1) != 1)
        {
            throw new ArgumentException($"GEMV shapes do not fit: x {CudaKernels.Shape(x)}, W {CudaKernels.Shape(weight)}, output {CudaKernels.Shape(output)} ({epilogue}).", nameof(output));
        }
        long xStride = x.dim() > 1 ? x.stride(-2) : k;
        long yStride = output.dim() > 1 ? output.stride(-2) : n;
        long xPointer = CudaKernels.DataPointer(x), weightPointer = CudaKernels.DataPointer(weight), outputPointer = CudaKernels.DataPointer(output);
        if (xStride * x.ElementSize % 16 != 0 || xPointer % 16 != 0 || weightPointer % 16 != 0)
        {
            throw new ArgumentException($"x's rows and W must start on 16-byte boundaries (x row stride {xStride}).", nameof(x));
        }
        var device = (int)Math.Max(x.device_index, 0);
        var function = Compiled.GetOrAdd(((int)rows, epilogue, norm is not null, x.dtype, device), key => CudaKernels.Function(Source, "decode_gemv",
            [
                ("ROWS", key.Rows.ToString(CultureInfo.InvariantCulture)),
                ("EPILOGUE", ((int)key.Epilogue).ToString(CultureInfo.InvariantCulture)),
                ("NORM", key.Norm ? "1" : "0"),
                ("SCALAR_KIND", CudaKernels.ScalarKind(key.DType)),
            ], key.Device));
        int outputs = (int)n, inputs = (int)k;
        long normPointer = norm is (var normWeight, _) ? CudaKernels.DataPointer(normWeight) : 0;
        var normEps = (float)(norm?.Eps ?? 0);
        var arguments = stackalloc void*[] { &xPointer, &xStride, &weightPointer, &outputs, &inputs, &outputPointer, &yStride, &normPointer, &normEps };
        CudaKernels.Launch(function, ((uint)((n + OutputsPerBlock - 1) / OutputsPerBlock), 1, 1), 256, device, arguments);
        GC.KeepAlive(x);
        GC.KeepAlive(weight);
        GC.KeepAlive(output);
        GC.KeepAlive(norm?.Weight);
    }
}

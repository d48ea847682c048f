using System.Globalization;
using static TorchSharp.torch;

namespace DslaMesh.Engine.Kernels;

/// <summary>
/// Llama's RMS norm as one launch of the engine's kernel (<c>rms_norm.cu</c>): one block per row that keeps the row in
/// registers, reads it once and rounds as Hugging Face's <c>LlamaRMSNorm</c> does (normalised value to the storage
/// type, then the scale). In a batch-1 decode step LibTorch's fused layer-norm kernel spends ~9 µs on a 4096-wide row
/// (one block of 128 threads, measured with Nsight Compute on an H200), twice per layer.
/// </summary>
/// <remarks>
/// Shapes: x [..., D] with the last dimension contiguous and rows a multiple of 16 bytes apart (any leading layout that
/// views as [rows, D]), weight [D] contiguous; returns a new [..., D] tensor. D must be a multiple of one 16-byte
/// vector and at most <see cref="MaxVectorsPerThread"/> vectors per thread. Launched on LibTorch's current stream, so
/// decode graphs capture it.
/// </remarks>
public static unsafe class RmsNormKernel
{
    /// <summary>
    /// Most rows worth a launch of this kernel: beyond, LibTorch's fused kernel is faster (H200, D = 4096, bf16: 2.2 vs
    /// 4.3 µs at 1–8 rows, 2.3 vs 4.5 at 32, 7.4 vs 6.0 at 1024, 94 vs 80 at 16384), so prefill keeps LibTorch's.
    /// </summary>
    public const long MaxRows = 256;

    /// <summary>Most 16-byte vectors of a row one thread holds (D ≤ 256 · 8 · 8 = 16384 in 16-bit types).</summary>
    public const int MaxVectorsPerThread = 8;

    private const string Source = "rms_norm.cu";
    private const int Threads = 256;

    private static readonly System.Collections.Concurrent.ConcurrentDictionary<(int VectorsPerThread, ScalarType DType, int Device), nint> Compiled = new();

    /// <summary>Why the kernel cannot normalise rows of <paramref name="size"/> in <paramref name="dtype"/> (null when it can); no device needed.</summary>
    public static string? UnsupportedShape(ScalarType dtype, long size)
    {
        if (dtype is not (ScalarType.BFloat16 or ScalarType.Float16 or ScalarType.Float32))
        {
            return $"dtype {dtype}";
        }
        var vector = 16 / (dtype == ScalarType.Float32 ? 4 : 2);
        return size < vector || size % vector != 0 || VectorsPerThread(size, vector) > MaxVectorsPerThread
            ? $"row size {size}"
            : null;
    }

    /// <summary>Why the kernel cannot serve a model of this dtype, device and width (null when it can).</summary>
    public static string? Unsupported(ScalarType dtype, TorchSharp.DeviceType deviceType, long size) =>
        CudaKernels.UnavailableOn(deviceType) ?? UnsupportedShape(dtype, size);

    /// <summary>
    /// Compiles (or loads from the disk cache) the kernel rows of <paramref name="size"/> in <paramref name="dtype"/>
    /// need, so that the first request does not pay for it. A no-op where <see cref="Unsupported"/> names a reason.
    /// </summary>
    public static void Prepare(ScalarType dtype, long size, Device device)
    {
        ArgumentNullException.ThrowIfNull(device);
        if (Unsupported(dtype, device.type, size) is null)
        {
            _ = Function(VectorsPerThread(size, dtype == ScalarType.Float32 ? 4 : 8), dtype, (int)Math.Max(device.index, 0));
        }
    }

    /// <summary>weight ⊙ normalise(x) over the last dimension, as a new tensor shaped like x.</summary>
    /// <exception cref="ArgumentException">Unsupported operands or a layout that does not fit (the message says which).</exception>
    public static Tensor Run(Tensor x, Tensor weight, double eps)
    {
        ArgumentNullException.ThrowIfNull(x);
        ArgumentNullException.ThrowIfNull(weight);
        var size = x.shape[^1];
        if (Unsupported(x.dtype, x.device_type, size) is { } reason)
        {
            throw new ArgumentException($"The RMS norm kernel does not support x {CudaKernels.Shape(x)} ({x.dtype} on {x.device}): {reason}.", nameof(x));
        }
        if (!IsWeightFor(weight, x, size))
        {
            throw new ArgumentException($"The norm's weight must be [{size}] contiguous, {x.dtype} on {x.device}; got {CudaKernels.Shape(weight)} {weight.dtype} on {weight.device}.", nameof(weight));
        }
        var rows = x.NumberOfElements / size;
        var input = x.view(rows, size);   // throws for layouts that do not view as rows, which callers avoid
        long xStride = input.stride(0);
        var xPointer = CudaKernels.DataPointer(input);
        if (input.stride(1) != 1 || xStride * x.ElementSize % 16 != 0 || xPointer % 16 != 0)
        {
            throw new ArgumentException($"x must have a contiguous last dimension and 16-byte aligned rows; strides [{string.Join(", ", x.stride())}].", nameof(x));
        }
        var output = empty(x.shape, dtype: x.dtype, device: x.device);
        long yStride = size, weightPointer = CudaKernels.DataPointer(weight), outputPointer = CudaKernels.DataPointer(output);
        var device = (int)Math.Max(x.device_index, 0);
        var vectorsPerThread = VectorsPerThread(size, 16 / (int)x.ElementSize);
        var function = Function(vectorsPerThread, x.dtype, device);
        var width = (int)size;
        var epsilon = (float)eps;
        if (rows > 0)
        {
            var arguments = stackalloc void*[] { &xPointer, &xStride, &weightPointer, &width, &epsilon, &outputPointer, &yStride };
            CudaKernels.Launch(function, ((uint)rows, 1, 1), Threads, device, arguments);
        }
        GC.KeepAlive(input);
        GC.KeepAlive(weight);
        return output;
    }

    /// <summary>Whether <paramref name="weight"/> can scale rows of <paramref name="x"/>: [<paramref name="size"/>] contiguous, x's dtype, on x's device.</summary>
    internal static bool IsWeightFor(Tensor weight, Tensor x, long size) =>
        weight.dtype == x.dtype && weight.device_type == x.device_type && weight.device_index == x.device_index
        && weight.dim() == 1 && weight.shape[0] == size && weight.is_contiguous();

    /// <summary>The same result with plain tensor ops (any device), as Hugging Face computes it: what the kernel is checked against.</summary>
    public static Tensor Reference(Tensor x, Tensor weight, double eps)
    {
        ArgumentNullException.ThrowIfNull(x);
        ArgumentNullException.ThrowIfNull(weight);
        using var scope = NewDisposeScope();
        var x32 = x.to(ScalarType.Float32);
        var normed = x32 * (x32.pow(2).mean([-1], keepdim: true) + eps).rsqrt();
        return (weight * normed.to(x.dtype)).MoveToOuterDisposeScope();
    }

    private static nint Function(int vectorsPerThread, ScalarType dtype, int device) =>
        Compiled.GetOrAdd((vectorsPerThread, dtype, device), key => CudaKernels.Function(Source, "rms_norm",
            [
                ("VECS_PER_THREAD", key.VectorsPerThread.ToString(CultureInfo.InvariantCulture)),
                ("SCALAR_KIND", CudaKernels.ScalarKind(key.DType)),
            ], key.Device));

    private static int VectorsPerThread(long size, int vector) => (int)((size / vector + Threads - 1) / Threads);
}

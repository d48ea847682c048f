using System.Runtime.InteropServices;

namespace DslaMesh.Engine.Backends;

/// <summary>
/// The raw <c>cudaStream_t</c> of LibTorch's current stream on a device (<c>c10::cuda::getCurrentCUDAStream(d).stream()</c>,
/// through the symbols <c>libc10_cuda.so</c> exports), so that work launched outside LibTorch is ordered with its own.
/// </summary>
public static unsafe class CudaStreams
{
    private static readonly Lazy<(nint Current, nint Raw)> Entries = new(() =>
    {
        var library = AtenShim.LoadedLibrary("libc10_cuda.so");
        if (library == 0
            || !NativeLibrary.TryGetExport(library, "_ZN3c104cuda20getCurrentCUDAStreamEa", out var current)
            || !NativeLibrary.TryGetExport(library, "_ZNK3c104cuda10CUDAStream6streamEv", out var raw))
        {
            return (0, 0);
        }
        return (current, raw);
    });

    /// <summary>The current stream's handle (0 is the legacy default stream, which LibTorch uses unless told otherwise).</summary>
    /// <exception cref="InvalidOperationException">LibTorch's CUDA libraries are not loaded.</exception>
    public static nint Current(int device)
    {
        var (current, raw) = Entries.Value;
        if (current == 0)
        {
            throw new InvalidOperationException("LibTorch's CUDA stream functions (libc10_cuda.so) are not loaded.");
        }
        // c10::cuda::CUDAStream by value: a c10::Stream (device type and index, then the stream id), 16 bytes.
        var stream = ((delegate* unmanaged<sbyte, StreamValue>)current)((sbyte)device);
        return ((delegate* unmanaged<StreamValue*, nint>)raw)(&stream);
    }

    [StructLayout(LayoutKind.Sequential)]
    private readonly struct StreamValue
    {
        private readonly ulong _device;
        private readonly ulong _id;
    }
}

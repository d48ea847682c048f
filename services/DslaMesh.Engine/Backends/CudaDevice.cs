using System.Runtime.InteropServices;
using System.Text;

namespace DslaMesh.Engine.Backends;

/// <summary>
/// What TorchSharp does not tell about the GPU: its name and free memory, read from the CUDA runtime and driver that
/// the host's LibTorch already loaded. Every query returns null where the library or symbol is missing.
/// </summary>
public static unsafe class CudaDevice
{
    private static readonly string[] RuntimeNames = ["libcudart.so.13", "libcudart.so.12", "libcudart.so"];

    /// <summary>Free and total device memory in bytes of the current device, or null.</summary>
    public static (long Free, long Total)? MemoryInfo()
    {
        foreach (var name in RuntimeNames)
        {
            if (NativeLibrary.TryLoad(name, out var handle) && NativeLibrary.TryGetExport(handle, "cudaMemGetInfo", out var entry))
            {
                nuint free = 0, total = 0;
                var rc = ((delegate* unmanaged<nuint*, nuint*, int>)entry)(&free, &total);
                return rc == 0 ? ((long)free, (long)total) : null;
            }
        }
        return null;
    }

    /// <summary>The marketing name of device <paramref name="ordinal"/> (e.g. "NVIDIA H100 80GB HBM3"), or null.</summary>
    public static string? Name(int ordinal = 0)
    {
        if (!NativeLibrary.TryLoad("libcuda.so.1", out var driver)
            || !NativeLibrary.TryGetExport(driver, "cuDeviceGet", out var get)
            || !NativeLibrary.TryGetExport(driver, "cuDeviceGetName", out var getName))
        {
            return null;
        }
        int device = 0;
        if (((delegate* unmanaged<int*, int, int>)get)(&device, ordinal) != 0)
        {
            return null;
        }
        var buffer = stackalloc byte[256];
        if (((delegate* unmanaged<byte*, int, int, int>)getName)(buffer, 256, device) != 0)
        {
            return null;
        }
        var length = 0;
        while (length < 256 && buffer[length] != 0)
        {
            length++;
        }
        return Encoding.UTF8.GetString(buffer, length);
    }
}

using System.Collections.Concurrent;
using System.Diagnostics.CodeAnalysis;
using System.Runtime.InteropServices;
using TorchSharp;
using static TorchSharp.torch;

namespace DslaMesh.Engine.Backends;

/// <summary>
/// Calls into LibTorch's stable C ABI (the <c>aoti_torch_*</c> functions PyTorch exports for AOTInductor) for the few
/// kernels and queries TorchSharp does not bind. Their tensor handles are the same <c>at::Tensor*</c> TorchSharp uses.
/// Every entry point is optional: when the loaded LibTorch lacks one, or it fails, callers fall back to composite ops.
/// </summary>
public static unsafe class AtenShim
{
    private static readonly ConcurrentDictionary<string, nint> Symbols = new(StringComparer.Ordinal);
    private static readonly ConcurrentDictionary<string, bool> Disabled = new(StringComparer.Ordinal);
    private static nint _dataPointer = -1;
    private static nint _rmsNormCpu = -1;
    private static nint _rmsNormCuda = -1;

    /// <summary>
    /// Fused RMS norm of the last dimension (<c>at::_fused_rms_norm</c>): one kernel on CUDA instead of eight. Computes in
    /// fp32 and rounds once. Bypasses autograd, so callers use it only with gradients off.
    /// </summary>
    /// <returns>False when the shim is missing or failed; <paramref name="output"/> is then null.</returns>
    /// <param name="input">Tensor [..., D].</param>
    /// <param name="weight">Scale [D], or null.</param>
    /// <param name="eps">Added to the mean square.</param>
    /// <param name="output">The normalised tensor, in <paramref name="input"/>'s dtype.</param>
    /// <param name="normalizedSize">D when the caller knows it (saves a native call), else 0.</param>
    public static bool TryFusedRmsNorm(Tensor input, Tensor? weight, double eps, [NotNullWhen(true)] out Tensor? output, long normalizedSize = 0)
    {
        ArgumentNullException.ThrowIfNull(input);
        output = null;
        var cuda = input.device_type == DeviceType.CUDA;
        // Hot path (twice per layer per step): a cached pointer, 0 once missing or failed.
        var entry = cuda ? _rmsNormCuda : _rmsNormCpu;
        if (entry == -1)
        {
            entry = Resolve(cuda ? "libtorch_cuda.so" : "libtorch_cpu.so", cuda ? "aoti_torch_cuda__fused_rms_norm" : "aoti_torch_cpu__fused_rms_norm");
            _ = cuda ? _rmsNormCuda = entry : _rmsNormCpu = entry;
        }
        if (entry == 0)
        {
            return false;
        }
        var fn = (delegate* unmanaged<nint, long*, long, nint*, double*, nint*, nint*, int>)entry;
        var shape = normalizedSize > 0 ? normalizedSize : input.shape[^1];
        var weightHandle = weight?.Handle ?? 0;
        nint result = 0, rstd = 0;
        var rc = fn(input.Handle, &shape, 1, weight is null ? null : &weightHandle, &eps, &result, &rstd);
        GC.KeepAlive(input);
        GC.KeepAlive(weight);
        if (rstd != 0)
        {
            Tensor.UnsafeCreateTensor(rstd).Dispose();
        }
        if (rc != 0 || result == 0)
        {
            if (result != 0)
            {
                Tensor.UnsafeCreateTensor(result).Dispose();
            }
            Disabled[cuda ? "aoti_torch_cuda__fused_rms_norm" : "aoti_torch_cpu__fused_rms_norm"] = true;
            _ = cuda ? _rmsNormCuda = 0 : _rmsNormCpu = 0;
            return false;
        }
        output = Tensor.UnsafeCreateTensor(result);
        return true;
    }

    /// <summary>Whether the fused RMS norm kernel is available for a device type (resolves it on first use).</summary>
    public static bool HasFusedRmsNorm(DeviceType device) => device == DeviceType.CUDA
        ? Resolve("libtorch_cuda.so", "aoti_torch_cuda__fused_rms_norm") != 0 && !Disabled.ContainsKey("aoti_torch_cuda__fused_rms_norm")
        : Resolve("libtorch_cpu.so", "aoti_torch_cpu__fused_rms_norm") != 0 && !Disabled.ContainsKey("aoti_torch_cpu__fused_rms_norm");

    /// <summary>The address of a tensor's first element, or null when the shim is unavailable. Host metadata only; never syncs.</summary>
    public static nint? DataPointer(Tensor tensor)
    {
        ArgumentNullException.ThrowIfNull(tensor);
        var entry = _dataPointer;
        if (entry == -1)
        {
            entry = _dataPointer = Resolve("libtorch_cpu.so", "aoti_torch_get_data_ptr");
        }
        if (entry == 0)
        {
            return null;
        }
        var fn = (delegate* unmanaged<nint, nint*, int>)entry;
        nint pointer = 0;
        var rc = fn(tensor.Handle, &pointer);
        GC.KeepAlive(tensor);
        return rc == 0 ? pointer : null;
    }

    /// <summary>
    /// Turns LibTorch's cuDNN backend for scaled-dot-product attention on or off (<c>at::globalContext().setSDPUseCuDNN</c>,
    /// what <c>torch.backends.cuda.enable_cudnn_sdp</c> sets in Python). Returns whether it is enabled afterwards, or null when
    /// the loaded LibTorch does not export the switch.
    /// </summary>
    /// <remarks>
    /// cuDNN attention builds an execution plan for every new sequence length; in decode, where the KV length grows by
    /// one each step, that cost lands on every attention call (about 2 ms on an H200), so the engine turns it off and
    /// SDPA uses FlashAttention or the memory-efficient kernel instead.
    /// </remarks>
    public static bool? SetCudnnAttention(bool enabled)
    {
        var context = Resolve("libtorch_cpu.so", "_ZN2at13globalContextEv");
        var set = Resolve("libtorch_cpu.so", "_ZN2at7Context14setSDPUseCuDNNEb");
        var get = Resolve("libtorch_cpu.so", "_ZNK2at7Context19userEnabledCuDNNSDPEv");
        if (context == 0 || set == 0 || get == 0)
        {
            return null;
        }
        var global = ((delegate* unmanaged<nint>)context)();
        ((delegate* unmanaged<nint, byte, void>)set)(global, enabled ? (byte)1 : (byte)0);
        return ((delegate* unmanaged<nint, byte>)get)(global) != 0;
    }

    /// <summary>Whether LibTorch may use cuDNN for scaled-dot-product attention, or null when unknown.</summary>
    public static bool? CudnnAttentionEnabled()
    {
        var context = Resolve("libtorch_cpu.so", "_ZN2at13globalContextEv");
        var get = Resolve("libtorch_cpu.so", "_ZNK2at7Context19userEnabledCuDNNSDPEv");
        return context == 0 || get == 0 ? null : ((delegate* unmanaged<nint, byte>)get)(((delegate* unmanaged<nint>)context)()) != 0;
    }

    private static nint Resolve(string library, string symbol) => Symbols.GetOrAdd(symbol, _ =>
    {
        var handle = LoadedLibrary(library);
        return handle != 0 && NativeLibrary.TryGetExport(handle, symbol, out var address) ? address : 0;
    });

    /// <summary>
    /// A handle to an already loaded LibTorch library: by soname first (glibc matches loaded objects by soname), else by
    /// the path this process mapped it from.
    /// </summary>
    internal static nint LoadedLibrary(string soname)
    {
        if (NativeLibrary.TryLoad(soname, out var handle))
        {
            return handle;
        }
        var path = LoadedLibraryPath(soname);
        return path is not null && NativeLibrary.TryLoad(path, out handle) ? handle : 0;
    }

    /// <summary>The path this process mapped a library with this file name from (<c>/proc/self/maps</c>), or null.</summary>
    internal static string? LoadedLibraryPath(string soname)
    {
        try
        {
            return File.ReadLines("/proc/self/maps")
                .Select(l => l.IndexOf('/', StringComparison.Ordinal) is var i and >= 0 ? l[i..] : null)
                .FirstOrDefault(p => p is not null && Path.GetFileName(p) == soname);
        }
        catch (IOException)
        {
            return null;
        }
    }
}

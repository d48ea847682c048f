using System.Diagnostics;
using System.Runtime.InteropServices;
using TorchSharp;

namespace DslaMesh.Engine.Backends;

/// <summary>
/// Starts TorchSharp once per process on the configured device: patches the CPU bridge where the host needs it and,
/// for CUDA, loads the host's own CUDA LibTorch (NuGet serves no CUDA build for Linux).
/// </summary>
public static class TorchRuntime
{
    private static readonly Lock Gate = new();
    private static TorchBackendOptions? _active;

    /// <summary>The options the runtime was started with, or null before <see cref="Initialize"/>.</summary>
    public static TorchBackendOptions? Active => _active;

    /// <summary>Starts the runtime on CPU with default options (idempotent).</summary>
    public static torch.Device EnsureCpu() => Initialize(new TorchBackendOptions());

    /// <summary>Starts the runtime (idempotent) and returns the device tensors should live on.</summary>
    /// <exception cref="InvalidOperationException">The runtime was already started on another device, or CUDA is unavailable.</exception>
    public static torch.Device Initialize(TorchBackendOptions options)
    {
        ArgumentNullException.ThrowIfNull(options);
        lock (Gate)
        {
            if (_active is not null)
            {
                if (_active.IsCuda != options.IsCuda)
                {
                    throw new InvalidOperationException($"TorchSharp already runs on '{_active.Device}'; it cannot switch to '{options.Device}' in one process.");
                }
                return torch.device(options.Device);
            }
            LibTorchSharpLoader.EnsureLoadable();
            if (options.IsCuda)
            {
                LoadExternalLibTorch(options.LibTorchDirectory ?? DiscoverPythonLibTorch(), cuda: true);
                torch.InitializeDeviceType(DeviceType.CUDA);
                if (!torch.cuda.is_available())
                {
                    throw new InvalidOperationException("CUDA LibTorch loaded but no CUDA device is visible (check the driver and CUDA_VISIBLE_DEVICES).");
                }
                AtenShim.SetCudnnAttention(options.CudnnAttention);
            }
            else
            {
                if (!HasBundledLibTorch())
                {
                    // A bundle built with DslaTorchBackend=external ships no LibTorch: use the host's for CPU too.
                    LoadExternalLibTorch(options.LibTorchDirectory ?? DiscoverPythonLibTorch(), cuda: false);
                }
                torch.InitializeDeviceType(DeviceType.CPU);
            }
            if (options.CpuThreads > 0)
            {
                torch.set_num_threads(options.CpuThreads);
            }
            _active = options;
            return torch.device(options.Device);
        }
    }

    /// <summary>The dtype the options ask for, with the per-device default.</summary>
    public static torch.ScalarType ResolveDType(TorchBackendOptions options)
    {
        var name = options.DType ?? (options.IsCuda ? "bfloat16" : "float32");
        return ParseDType(name) ?? throw new ArgumentException($"Unsupported dtype '{name}'.", nameof(options));
    }

    /// <summary>The dtype a name stands for (float32, bfloat16, float16); null for any other name.</summary>
    public static torch.ScalarType? ParseDType(string? name) => name switch
    {
        "float32" => torch.ScalarType.Float32,
        "bfloat16" => torch.ScalarType.BFloat16,
        "float16" => torch.ScalarType.Float16,
        _ => null,
    };

    /// <summary>The LibTorch folder loaded from outside the application, or null when it ships its own.</summary>
    public static string? ExternalLibTorchDirectory { get; private set; }

    private static void LoadExternalLibTorch(string directory, bool cuda)
    {
        var required = Path.Combine(directory, cuda ? "libtorch_cuda.so" : "libtorch_cpu.so");
        if (!File.Exists(required))
        {
            throw new InvalidOperationException(cuda
                ? $"No libtorch_cuda.so in '{directory}'. Set TorchBackend:LibTorchDirectory (--libtorch) to a CUDA LibTorch folder (PyTorch's site-packages/torch/lib)."
                : $"This build ships no LibTorch and '{directory}' has no libtorch_cpu.so. Set TorchBackend:LibTorchDirectory (--libtorch) to a LibTorch folder.");
        }
        // Loading the libraries by path first makes TorchSharp's bridge bind to them by soname instead of looking for a
        // LibTorch beside the application. torch_cuda pulls in its CUDA libraries through its own RPATH.
        var names = cuda
            ? new[] { "libc10.so", "libtorch_cpu.so", "libc10_cuda.so", "libtorch_cuda.so", "libtorch.so" }
            : new[] { "libc10.so", "libtorch_cpu.so", "libtorch.so" };
        foreach (var name in names)
        {
            var path = Path.Combine(directory, name);
            if (File.Exists(path))
            {
                NativeLibrary.Load(path);
            }
        }
        ExternalLibTorchDirectory = directory;
    }

    /// <summary>Whether a LibTorch CPU build sits beside the application (the TorchSharp-cpu package).</summary>
    private static bool HasBundledLibTorch()
    {
        var rid = RuntimeInformation.ProcessArchitecture == Architecture.Arm64 ? "linux-arm64" : "linux-x64";
        return new[] { AppContext.BaseDirectory, Path.GetDirectoryName(typeof(torch).Assembly.Location) ?? AppContext.BaseDirectory }
            .SelectMany(r => new[] { Path.Combine(r, "libtorch_cpu.so"), Path.Combine(r, "runtimes", rid, "native", "libtorch_cpu.so") })
            .Any(File.Exists) || !OperatingSystem.IsLinux();
    }

    /// <summary>Asks the host's python3 where PyTorch keeps its libraries.</summary>
    public static string DiscoverPythonLibTorch()
    {
        var python = Environment.GetEnvironmentVariable("DSLAMESH_PYTHON") ?? "python3";
        var start = new ProcessStartInfo(python, ["-c", "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'lib'))"])
        {
            RedirectStandardOutput = true,
            RedirectStandardError = true,
        };
        try
        {
            using var process = Process.Start(start) ?? throw new InvalidOperationException($"Could not start '{python}'.");
            var output = process.StandardOutput.ReadToEnd().Trim();
            var error = process.StandardError.ReadToEnd();
            if (!process.WaitForExit(TimeSpan.FromSeconds(60)) || process.ExitCode != 0 || output.Length == 0)
            {
                throw new InvalidOperationException($"'{python} -c \"import torch\"' failed: {error.Trim()}");
            }
            return output;
        }
        catch (System.ComponentModel.Win32Exception e)
        {
            throw new InvalidOperationException($"No CUDA LibTorch configured and '{python}' is not on PATH to discover one. Set TorchBackend:LibTorchDirectory.", e);
        }
    }
}

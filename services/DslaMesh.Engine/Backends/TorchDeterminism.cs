using System.Runtime.InteropServices;

namespace DslaMesh.Engine.Backends;

/// <summary>
/// LibTorch's global switches for reproducible training that TorchSharp 0.107 does not expose
/// (<c>torch.use_deterministic_algorithms</c>, the memory-efficient and cuDNN SDPA back ends). They are plain
/// <c>at::Context</c> methods exported by <c>libtorch_cpu.so</c>, so they are called through their (stable, Itanium
/// ABI) symbol names on whichever LibTorch the process loaded, the CPU one from NuGet or the host's CUDA one.
/// </summary>
/// <remarks>
/// What a run needs to repeat bit for bit on the same hardware and LibTorch: deterministic algorithms (index_add,
/// the embedding gradient, take the sorted path on CUDA), attention through the math SDPA back end only (the flash
/// and memory-efficient backward passes accumulate with atomics), and <c>CUBLAS_WORKSPACE_CONFIG=:4096:8</c> in the
/// native environment before cuBLAS starts. .NET's <see cref="Environment.SetEnvironmentVariable(string, string?)"/>
/// does not reach the C runtime's <c>getenv</c> on Linux, so the variable is set through libc.
/// </remarks>
public static unsafe partial class TorchDeterminism
{
    private const string GlobalContextSymbol = "_ZN2at13globalContextEv";
    private const string SetDeterministicSymbol = "_ZN2at7Context26setDeterministicAlgorithmsEbb";
    private const string GetDeterministicSymbol = "_ZNK2at7Context23deterministicAlgorithmsEv";
    private const string SetFlashSymbol = "_ZN2at7Context14setSDPUseFlashEb";
    private const string SetMemEfficientSymbol = "_ZN2at7Context21setSDPUseMemEfficientEb";
    private const string SetCuDnnSymbol = "_ZN2at7Context14setSDPUseCuDNNEb";
    private const string SetMathSymbol = "_ZN2at7Context13setSDPUseMathEb";

    /// <summary>
    /// Turns on deterministic algorithms (warn-only: an operation without a deterministic implementation warns instead
    /// of failing the run) and, on CUDA, restricts attention to the math back end and sets the cuBLAS workspace.
    /// Call after <see cref="TorchRuntime.Initialize"/> and before the first CUDA matmul.
    /// </summary>
    /// <returns>What was applied, for the training manifest; fields are false where the symbol was not found.</returns>
    public static DeterminismSettings Enable(bool cuda)
    {
        var cublas = false;
        if (cuda)
        {
            cublas = Environment.GetEnvironmentVariable("CUBLAS_WORKSPACE_CONFIG") is { Length: > 0 }
                || SetNativeEnvironment("CUBLAS_WORKSPACE_CONFIG", ":4096:8");
        }
        var library = FindLibTorchCpu();
        if (library == 0 || !NativeLibrary.TryGetExport(library, GlobalContextSymbol, out var contextExport))
        {
            return new DeterminismSettings(false, false, cublas);
        }
        var context = ((delegate* unmanaged<nint>)contextExport)();
        var deterministic = false;
        if (NativeLibrary.TryGetExport(library, SetDeterministicSymbol, out var setDeterministic)
            && NativeLibrary.TryGetExport(library, GetDeterministicSymbol, out var getDeterministic))
        {
            ((delegate* unmanaged<nint, byte, byte, void>)setDeterministic)(context, 1, 1);
            deterministic = ((delegate* unmanaged<nint, byte>)getDeterministic)(context) != 0;
        }
        var mathOnly = false;
        if (cuda)
        {
            mathOnly = true;
            foreach (var (symbol, enable) in new[] { (SetFlashSymbol, false), (SetMemEfficientSymbol, false), (SetCuDnnSymbol, false), (SetMathSymbol, true) })
            {
                if (NativeLibrary.TryGetExport(library, symbol, out var setter))
                {
                    ((delegate* unmanaged<nint, byte, void>)setter)(context, enable ? (byte)1 : (byte)0);
                }
                else
                {
                    mathOnly = false;
                }
            }
        }
        return new DeterminismSettings(deterministic, mathOnly, cublas);
    }

    /// <summary>Whether LibTorch's deterministic-algorithms flag is on (false if it cannot be read).</summary>
    public static bool IsDeterministic()
    {
        var library = FindLibTorchCpu();
        if (library == 0
            || !NativeLibrary.TryGetExport(library, GlobalContextSymbol, out var contextExport)
            || !NativeLibrary.TryGetExport(library, GetDeterministicSymbol, out var getDeterministic))
        {
            return false;
        }
        var context = ((delegate* unmanaged<nint>)contextExport)();
        return ((delegate* unmanaged<nint, byte>)getDeterministic)(context) != 0;
    }

    /// <summary>The loaded <c>libtorch_cpu.so</c>, found through the process's memory map (0 if none is loaded).</summary>
    private static nint FindLibTorchCpu()
    {
        if (!OperatingSystem.IsLinux())
        {
            return 0;
        }
        foreach (var line in File.ReadLines("/proc/self/maps"))
        {
            var slash = line.IndexOf('/', StringComparison.Ordinal);
            if (slash < 0)
            {
                continue;
            }
            var path = line[slash..];
            if (Path.GetFileName(path).StartsWith("libtorch_cpu.so", StringComparison.Ordinal)
                && NativeLibrary.TryLoad(path, out var handle))
            {
                return handle;
            }
        }
        return 0;
    }

    private static bool SetNativeEnvironment(string name, string value)
    {
        Environment.SetEnvironmentVariable(name, value);
        return OperatingSystem.IsLinux() && Setenv(name, value, 1) == 0;
    }

    [LibraryImport("libc", EntryPoint = "setenv", StringMarshalling = StringMarshalling.Utf8)]
    private static partial int Setenv(string name, string value, int overwrite);
}

/// <summary>Which reproducibility switches a training run has on.</summary>
/// <param name="DeterministicAlgorithms">LibTorch's deterministic-algorithms flag (warn-only).</param>
/// <param name="MathAttentionOnly">CUDA: SDPA limited to the math back end.</param>
/// <param name="CublasWorkspaceConfig">CUDA: <c>CUBLAS_WORKSPACE_CONFIG</c> set in the native environment.</param>
public sealed record DeterminismSettings(bool DeterministicAlgorithms, bool MathAttentionOnly, bool CublasWorkspaceConfig);

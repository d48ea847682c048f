using System.Collections.Concurrent;
using System.Globalization;
using System.Runtime.InteropServices;
using System.Security.Cryptography;
using System.Text;
using DslaMesh.Engine.Backends;

namespace DslaMesh.Engine.Kernels;

/// <summary>
/// The engine's own CUDA C kernels, compiled at run time with NVRTC (the <c>libnvrtc.so</c> every PyTorch CUDA install
/// ships beside LibTorch), loaded with the CUDA driver API (<c>libcuda.so.1</c>) into the primary context LibTorch uses,
/// and launched on LibTorch's current stream, so they are ordered with TorchSharp's own work. TorchSharp has no
/// custom-op route; this needs none: kernels take raw device pointers.
/// </summary>
/// <remarks>
/// Sources are embedded resources (<c>Kernels/*.cu</c>, each prefixed with <c>Kernels/scalar.cuh</c>). A compiled module is cached on disk per source, options, NVRTC
/// version and GPU architecture (<see cref="CacheDirectory"/>), so only the first start on a machine compiles (about a
/// second per variant). Nothing here is touched on CPU: <see cref="IsAvailable"/> is false there and callers run their
/// plain tensor code instead.
/// </remarks>
public static unsafe class CudaKernels
{
    private const string SharedHeader = "scalar.cuh";
    private const int DeviceAttributeMultiprocessorCount = 16;
    private const int DeviceAttributeComputeCapabilityMajor = 75;
    private const int DeviceAttributeComputeCapabilityMinor = 76;
    private static readonly Lazy<Api?> Native = new(Load);
    private static readonly ConcurrentDictionary<string, nint> Modules = new(StringComparer.Ordinal);
    private static readonly ConcurrentDictionary<string, nint> Functions = new(StringComparer.Ordinal);
    private static readonly ConcurrentDictionary<int, (int Major, int Minor, int Multiprocessors)> Devices = new();
    private static string? _unavailableReason;

    /// <summary>Whether NVRTC and the CUDA driver could be loaded (false on machines without CUDA).</summary>
    public static bool IsAvailable => Native.Value is not null;

    /// <summary>Why the kernels are unavailable, or null when they are available.</summary>
    public static string? UnavailableReason => Native.Value is null ? _unavailableReason : null;

    /// <summary>Why no kernel can run on a device of this type (not CUDA, or no NVRTC/driver), or null when one can.</summary>
    public static string? UnavailableOn(TorchSharp.DeviceType deviceType) =>
        deviceType != TorchSharp.DeviceType.CUDA ? "not a CUDA tensor" : UnavailableReason;

    /// <summary>
    /// Where compiled modules are kept: <c>DSLAMESH_KERNEL_CACHE</c>, else <c>$XDG_CACHE_HOME/dslamesh/kernels</c>, else
    /// <c>~/.cache/dslamesh/kernels</c>.
    /// </summary>
    public static string CacheDirectory =>
        Environment.GetEnvironmentVariable("DSLAMESH_KERNEL_CACHE") is { Length: > 0 } explicitPath
            ? explicitPath
            : Path.Combine(
                Environment.GetEnvironmentVariable("XDG_CACHE_HOME") is { Length: > 0 } xdg ? xdg : Path.Combine(Environment.GetFolderPath(Environment.SpecialFolder.UserProfile), ".cache"),
                "dslamesh", "kernels");

    /// <summary>The NVRTC library loaded, for reports.</summary>
    public static string? NvrtcPath => Native.Value?.NvrtcPath;

    /// <summary>The <c>SCALAR_KIND</c> define of <c>scalar.cuh</c> for a dtype the kernels take (fp32, bf16 or fp16).</summary>
    public static string ScalarKind(TorchSharp.torch.ScalarType dtype) => dtype switch
    {
        TorchSharp.torch.ScalarType.Float32 => "0",
        TorchSharp.torch.ScalarType.BFloat16 => "1",
        TorchSharp.torch.ScalarType.Float16 => "2",
        _ => throw new ArgumentException($"The CUDA kernels take fp32, bf16 or fp16, not {dtype}.", nameof(dtype)),
    };

    /// <summary>Streaming multiprocessors of a device (to size grids).</summary>
    public static int MultiprocessorCount(int device) => DeviceInfo(device).Multiprocessors;

    /// <summary>
    /// The kernel <paramref name="name"/> of embedded source <paramref name="source"/> compiled with
    /// <paramref name="defines"/> for <paramref name="device"/>'s architecture (compiled, or read from the disk cache, on
    /// first use). Returns a CUfunction handle; callers on hot paths keep it (building the lookup key costs strings).
    /// </summary>
    /// <exception cref="InvalidOperationException">CUDA is unavailable, or the source does not compile (NVRTC's log is in the message).</exception>
    public static nint Function(string source, string name, IReadOnlyList<(string Name, string Value)> defines, int device)
    {
        var api = Native.Value ?? throw new InvalidOperationException($"CUDA kernels are unavailable: {UnavailableReason}.");
        var info = DeviceInfo(device);
        var options = new List<string> { $"--gpu-architecture=sm_{info.Major}{info.Minor}", "--std=c++17", "--use_fast_math" };
        options.AddRange(defines.Select(d => $"-D{d.Name}={d.Value}"));
        var moduleKey = $"{source}|{string.Join(' ', options)}|{device}";
        return Functions.GetOrAdd($"{moduleKey}|{name}", _ =>
        {
            api.MakeContextCurrent(device);
            // One compile and load per module, however many of its kernels are asked for.
            var module = Modules.GetOrAdd(moduleKey, _ =>
            {
                var image = Compile(api, source, options, $"sm{info.Major}{info.Minor}");
                nint loaded;
                fixed (byte* data = image)
                {
                    api.Check(api.ModuleLoadData(&loaded, data), "cuModuleLoadData");
                }
                return loaded;
            });
            nint function;
            var utf8 = Encoding.UTF8.GetBytes(name + "\0");
            fixed (byte* symbol = utf8)
            {
                api.Check(api.ModuleGetFunction(&function, module, symbol), $"cuModuleGetFunction({name})");
            }
            return function;
        });
    }

    /// <summary>
    /// Launches <paramref name="function"/> on LibTorch's current stream of <paramref name="device"/>.
    /// <paramref name="arguments"/> holds one pointer per kernel parameter, each to a value of the parameter's exact type.
    /// </summary>
    public static void Launch(nint function, (uint X, uint Y, uint Z) grid, uint threads, int device, void** arguments)
    {
        var api = Native.Value ?? throw new InvalidOperationException($"CUDA kernels are unavailable: {UnavailableReason}.");
        api.MakeContextCurrent(device);
        var stream = CudaStreams.Current(device);
        api.Check(api.LaunchKernel(function, grid.X, grid.Y, grid.Z, threads, 1, 1, 0, stream, arguments, null), "cuLaunchKernel");
    }

    /// <summary>The device address of a tensor's first element, for kernel arguments.</summary>
    /// <exception cref="InvalidOperationException">LibTorch does not export the accessor.</exception>
    public static long DataPointer(TorchSharp.torch.Tensor tensor) =>
        Backends.AtenShim.DataPointer(tensor) ?? throw new InvalidOperationException("LibTorch does not export aoti_torch_get_data_ptr; the CUDA kernels need it.");

    /// <summary>A tensor's shape as [a, b, …], for error messages.</summary>
    public static string Shape(TorchSharp.torch.Tensor tensor) => "[" + string.Join(", ", tensor.shape) + "]";

    /// <summary>
    /// Starts (true) or stops (false) collection by a CUDA profiler attached with collection off at start (Nsight
    /// Compute's <c>--profile-from-start off</c>), so that it sees only the bracketed work; a no-op without a profiler.
    /// </summary>
    public static void ProfilerRange(bool start, int device)
    {
        var api = Native.Value ?? throw new InvalidOperationException($"CUDA kernels are unavailable: {UnavailableReason}.");
        api.MakeContextCurrent(device);
        api.Check(start ? api.ProfilerStart() : api.ProfilerStop(), start ? "cuProfilerStart" : "cuProfilerStop");
    }

    private static (int Major, int Minor, int Multiprocessors) DeviceInfo(int device) => Devices.GetOrAdd(device, ordinal =>
    {
        var api = Native.Value ?? throw new InvalidOperationException($"CUDA kernels are unavailable: {UnavailableReason}.");
        int handle, major, minor, count;
        api.Check(api.DeviceGet(&handle, ordinal), "cuDeviceGet");
        api.Check(api.DeviceGetAttribute(&major, DeviceAttributeComputeCapabilityMajor, handle), "cuDeviceGetAttribute");
        api.Check(api.DeviceGetAttribute(&minor, DeviceAttributeComputeCapabilityMinor, handle), "cuDeviceGetAttribute");
        api.Check(api.DeviceGetAttribute(&count, DeviceAttributeMultiprocessorCount, handle), "cuDeviceGetAttribute");
        return (major, minor, count);
    });

    private static byte[] Compile(Api api, string source, List<string> options, string architecture)
    {
        // Every kernel source starts from the shared storage types (scalar.cuh), prefixed here: NVRTC has no include path.
        var text = EmbeddedSource(SharedHeader) + "\n" + EmbeddedSource(source);
        int nvrtcMajor, nvrtcMinor;
        api.Version(&nvrtcMajor, &nvrtcMinor);
        var hash = Convert.ToHexStringLower(SHA256.HashData(Encoding.UTF8.GetBytes($"{text}\n{string.Join('\n', options)}\nnvrtc {nvrtcMajor}.{nvrtcMinor}")));
        var cached = Path.Combine(CacheDirectory, $"{Path.GetFileNameWithoutExtension(source)}-{hash[..24]}-{architecture}.cubin");
        if (File.Exists(cached))
        {
            return File.ReadAllBytes(cached);
        }
        nint program;
        var sourceBytes = Encoding.UTF8.GetBytes(text + "\0");
        var nameBytes = Encoding.UTF8.GetBytes(source + "\0");
        fixed (byte* src = sourceBytes, programName = nameBytes)
        {
            api.CheckNvrtc(api.CreateProgram(&program, src, programName, 0, null, null), "nvrtcCreateProgram", 0);
        }
        try
        {
            var encoded = options.Select(o => Marshal.StringToCoTaskMemUTF8(o)).ToArray();
            try
            {
                fixed (nint* optionPointers = encoded)
                {
                    api.CheckNvrtc(api.CompileProgram(program, encoded.Length, (byte**)optionPointers), $"compiling {source} ({string.Join(' ', options)})", program);
                }
            }
            finally
            {
                foreach (var pointer in encoded)
                {
                    Marshal.FreeCoTaskMem(pointer);
                }
            }
            nuint size;
            api.CheckNvrtc(api.GetCubinSize(program, &size), "nvrtcGetCUBINSize", program);
            var image = new byte[size];
            fixed (byte* data = image)
            {
                api.CheckNvrtc(api.GetCubin(program, data), "nvrtcGetCUBIN", program);
            }
            TryWriteCache(cached, image);
            return image;
        }
        finally
        {
            api.DestroyProgram(&program);
        }
    }

    private static void TryWriteCache(string path, byte[] image)
    {
        try
        {
            Directory.CreateDirectory(Path.GetDirectoryName(path)!);
            var temporary = $"{path}.{Environment.ProcessId}.tmp";
            File.WriteAllBytes(temporary, image);
            File.Move(temporary, path, overwrite: true);
        }
        catch (IOException)
        {
            // A read-only or full cache only costs the next start a compile.
        }
        catch (UnauthorizedAccessException)
        {
        }
    }

    /// <summary>The text of an embedded kernel source (<c>Kernels/NAME.cu</c>).</summary>
    internal static string EmbeddedSource(string source)
    {
        var assembly = typeof(CudaKernels).Assembly;
        var resource = assembly.GetManifestResourceNames().FirstOrDefault(n => n.EndsWith("." + source, StringComparison.Ordinal))
            ?? throw new InvalidOperationException($"No embedded kernel source '{source}' in {assembly.GetName().Name}.");
        using var stream = assembly.GetManifestResourceStream(resource)!;
        using var reader = new StreamReader(stream);
        return reader.ReadToEnd();
    }

    private static Api? Load()
    {
        if (!NativeLibrary.TryLoad("libcuda.so.1", out var driver))
        {
            _unavailableReason = "the CUDA driver (libcuda.so.1) is not installed";
            return null;
        }
        var nvrtcPath = FindNvrtc();
        if (nvrtcPath is null || !NativeLibrary.TryLoad(nvrtcPath, out var nvrtc))
        {
            _unavailableReason = "NVRTC (libnvrtc.so) was not found beside LibTorch; set DSLAMESH_NVRTC to its path";
            return null;
        }
        try
        {
            var api = new Api(driver, nvrtc, nvrtcPath);
            api.Check(api.Init(0), "cuInit");
            return api;
        }
        catch (Exception error) when (error is EntryPointNotFoundException or InvalidOperationException)
        {
            _unavailableReason = error.Message;
            return null;
        }
    }

    /// <summary>
    /// <c>DSLAMESH_NVRTC</c>, else the newest <c>libnvrtc.so.N</c> in the Python site-packages of the loaded LibTorch
    /// (<c>site-packages/torch/lib</c> → <c>site-packages/nvidia/**</c>) or in LibTorch's own folder.
    /// </summary>
    private static string? FindNvrtc()
    {
        if (Environment.GetEnvironmentVariable("DSLAMESH_NVRTC") is { Length: > 0 } explicitPath)
        {
            return explicitPath;
        }
        var torchLib = Path.GetDirectoryName(AtenShim.LoadedLibraryPath("libtorch_cuda.so"));
        if (torchLib is null)
        {
            return null;
        }
        var roots = new[] { torchLib, Path.GetFullPath(Path.Combine(torchLib, "..", "..", "nvidia")) }.Where(Directory.Exists);
        return roots
            .SelectMany(root => Directory.EnumerateFiles(root, "libnvrtc.so*", SearchOption.AllDirectories))
            .Where(path => !Path.GetFileName(path).Contains("builtins", StringComparison.Ordinal))
            .OrderByDescending(path => path, StringComparer.Ordinal)
            .FirstOrDefault();
    }

    /// <summary>The driver and NVRTC entry points this class uses, resolved once.</summary>
    private sealed class Api
    {
        [ThreadStatic]
        private static int _currentDevice;
        private readonly nint _driver;
        private readonly nint _nvrtc;

        public Api(nint driver, nint nvrtc, string nvrtcPath)
        {
            _driver = driver;
            _nvrtc = nvrtc;
            NvrtcPath = nvrtcPath;
            Init = (delegate* unmanaged<uint, int>)Driver("cuInit");
            DeviceGet = (delegate* unmanaged<int*, int, int>)Driver("cuDeviceGet");
            DeviceGetAttribute = (delegate* unmanaged<int*, int, int, int>)Driver("cuDeviceGetAttribute");
            PrimaryContextRetain = (delegate* unmanaged<nint*, int, int>)Driver("cuDevicePrimaryCtxRetain");
            ContextGetCurrent = (delegate* unmanaged<nint*, int>)Driver("cuCtxGetCurrent");
            ContextSetCurrent = (delegate* unmanaged<nint, int>)Driver("cuCtxSetCurrent");
            ModuleLoadData = (delegate* unmanaged<nint*, void*, int>)Driver("cuModuleLoadData");
            ModuleGetFunction = (delegate* unmanaged<nint*, nint, byte*, int>)Driver("cuModuleGetFunction");
            LaunchKernel = (delegate* unmanaged<nint, uint, uint, uint, uint, uint, uint, uint, nint, void**, void**, int>)Driver("cuLaunchKernel");
            GetErrorString = (delegate* unmanaged<int, byte**, int>)Driver("cuGetErrorString");
            ProfilerStart = (delegate* unmanaged<int>)Driver("cuProfilerStart");
            ProfilerStop = (delegate* unmanaged<int>)Driver("cuProfilerStop");
            Version = (delegate* unmanaged<int*, int*, int>)Nvrtc("nvrtcVersion");
            CreateProgram = (delegate* unmanaged<nint*, byte*, byte*, int, byte**, byte**, int>)Nvrtc("nvrtcCreateProgram");
            CompileProgram = (delegate* unmanaged<nint, int, byte**, int>)Nvrtc("nvrtcCompileProgram");
            GetCubinSize = (delegate* unmanaged<nint, nuint*, int>)Nvrtc("nvrtcGetCUBINSize");
            GetCubin = (delegate* unmanaged<nint, byte*, int>)Nvrtc("nvrtcGetCUBIN");
            GetProgramLogSize = (delegate* unmanaged<nint, nuint*, int>)Nvrtc("nvrtcGetProgramLogSize");
            GetProgramLog = (delegate* unmanaged<nint, byte*, int>)Nvrtc("nvrtcGetProgramLog");
            DestroyProgram = (delegate* unmanaged<nint*, int>)Nvrtc("nvrtcDestroyProgram");
        }

        public string NvrtcPath { get; }
        public delegate* unmanaged<uint, int> Init { get; }
        public delegate* unmanaged<int*, int, int> DeviceGet { get; }
        public delegate* unmanaged<int*, int, int, int> DeviceGetAttribute { get; }
        public delegate* unmanaged<nint*, int, int> PrimaryContextRetain { get; }
        public delegate* unmanaged<nint*, int> ContextGetCurrent { get; }
        public delegate* unmanaged<nint, int> ContextSetCurrent { get; }
        public delegate* unmanaged<nint*, void*, int> ModuleLoadData { get; }
        public delegate* unmanaged<nint*, nint, byte*, int> ModuleGetFunction { get; }
        public delegate* unmanaged<nint, uint, uint, uint, uint, uint, uint, uint, nint, void**, void**, int> LaunchKernel { get; }
        public delegate* unmanaged<int, byte**, int> GetErrorString { get; }
        public delegate* unmanaged<int> ProfilerStart { get; }
        public delegate* unmanaged<int> ProfilerStop { get; }
        public delegate* unmanaged<int*, int*, int> Version { get; }
        public delegate* unmanaged<nint*, byte*, byte*, int, byte**, byte**, int> CreateProgram { get; }
        public delegate* unmanaged<nint, int, byte**, int> CompileProgram { get; }
        public delegate* unmanaged<nint, nuint*, int> GetCubinSize { get; }
        public delegate* unmanaged<nint, byte*, int> GetCubin { get; }
        public delegate* unmanaged<nint, nuint*, int> GetProgramLogSize { get; }
        public delegate* unmanaged<nint, byte*, int> GetProgramLog { get; }
        public delegate* unmanaged<nint*, int> DestroyProgram { get; }

        /// <summary>
        /// Makes the device's primary context (the one LibTorch's runtime uses) current on this thread, once per thread
        /// and device: a thread that has only run TorchSharp ops may have none current for the driver API yet.
        /// </summary>
        public void MakeContextCurrent(int device)
        {
            if (_currentDevice == device + 1)
            {
                return;
            }
            int handle;
            Check(DeviceGet(&handle, device), "cuDeviceGet");
            nint context;
            Check(PrimaryContextRetain(&context, handle), "cuDevicePrimaryCtxRetain");
            Check(ContextSetCurrent(context), "cuCtxSetCurrent");
            _currentDevice = device + 1;
        }

        public void Check(int result, string what)
        {
            if (result == 0)
            {
                return;
            }
            byte* text = null;
            _ = GetErrorString(result, &text);
            var message = text is null ? "unknown error" : Marshal.PtrToStringUTF8((nint)text);
            throw new InvalidOperationException($"{what} failed: CUDA error {result.ToString(CultureInfo.InvariantCulture)} ({message}).");
        }

        public void CheckNvrtc(int result, string what, nint program)
        {
            if (result == 0)
            {
                return;
            }
            var log = "";
            if (program != 0)
            {
                nuint size;
                if (GetProgramLogSize(program, &size) == 0 && size > 1)
                {
                    var buffer = new byte[size];
                    fixed (byte* data = buffer)
                    {
                        _ = GetProgramLog(program, data);
                    }
                    log = ":\n" + Encoding.UTF8.GetString(buffer, 0, (int)size - 1);
                }
            }
            throw new InvalidOperationException($"{what} failed: NVRTC error {result.ToString(CultureInfo.InvariantCulture)}{log}");
        }

        private nint Driver(string name) => NativeLibrary.TryGetExport(_driver, name, out var address)
            ? address
            : throw new EntryPointNotFoundException($"libcuda.so.1 lacks {name}");

        private nint Nvrtc(string name) => NativeLibrary.TryGetExport(_nvrtc, name, out var address)
            ? address
            : throw new EntryPointNotFoundException($"{NvrtcPath} lacks {name}");
    }
}

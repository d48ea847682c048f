using System.Runtime.InteropServices;
using static TorchSharp.torch;

namespace DslaMesh.Engine.Backends;

/// <summary>
/// A CUDA graph captured and replayed through LibTorch's own <c>at::cuda::CUDAGraph</c> (what
/// <c>torch.cuda.CUDAGraph</c> wraps in Python), reached through the C++ symbols <c>libtorch_cuda.so</c> and
/// <c>libc10_cuda.so</c> export; TorchSharp 0.107 binds no graphs or streams. LibTorch's class gives each graph a
/// private memory pool in the caching allocator, so tensors allocated while capturing keep their addresses for every
/// replay and nothing outside the graph is ever handed that memory.
/// </summary>
/// <remarks>
/// A replay re-runs every kernel the capture recorded, on the same addresses, with one launch: it is how a decode step
/// stops paying the host cost of each op (7–9 µs per launch through TorchSharp on the H100/H200 hosts measured).
/// Capturing requires a non-default stream: <see cref="CaptureAll"/> switches the calling thread's current stream to one
/// from LibTorch's pool, warms every segment up on it, captures each into its own graph and switches back. Replays run
/// on the caller's current stream, ordered with its other work.
/// </remarks>
public sealed unsafe class CudaGraph : IDisposable
{
    // sizeof(at::cuda::CUDAGraph) is a few hundred bytes in PyTorch 2.x; the object lives in memory we allocate, so
    // leave ample room for fields later versions add.
    private const nuint ObjectBytes = 16 * 1024;
    private const int CaptureModeThreadLocal = 1; // cudaStreamCaptureModeThreadLocal: other threads' CUDA calls stay legal
    private static readonly Lazy<Entries?> Api = new(Resolve);
    private void* _object;

    private CudaGraph(Entries api)
    {
        _object = NativeMemory.AllocZeroed(ObjectBytes);
        // The constructor takes keep_graph (false: capture_end instantiates and frees the raw graph) in recent
        // versions; older ones take nothing, and the extra register argument is ignored.
        api.Construct(_object, 0);
    }

    /// <summary>Whether the loaded LibTorch exports everything capture and replay need (false on CPU-only LibTorch).</summary>
    public static bool IsAvailable => Api.Value is not null;

    /// <summary>Why graphs are unavailable (the first missing symbol), or null when they are available.</summary>
    public static string? UnavailableReason => Api.Value is null ? MissingSymbol ?? "LibTorch's CUDA libraries are not loaded" : null;

    private static string? MissingSymbol { get; set; }

    /// <summary>
    /// Captures <paramref name="count"/> segments, each into its own graph, on a side stream of <paramref name="device"/>.
    /// Every segment runs once uncaptured first (lazy cuBLAS and workspace set-up must not happen inside a capture);
    /// segments read and write only tensors that outlive the graphs (static inputs, and outputs the segment keeps).
    /// </summary>
    /// <param name="device">The CUDA device the segments run on.</param>
    /// <param name="count">Number of segments.</param>
    /// <param name="warmUp">Runs segment i uncaptured; what it allocates is the caller's to dispose.</param>
    /// <param name="record">Runs segment i under capture; the tensors it keeps belong to the graphs' memory pool.</param>
    /// <remarks>
    /// The graphs share one memory pool (<c>at::cuda::graph_pool_handle</c>), which is safe because they are always
    /// replayed in the order they were captured and never concurrently; where LibTorch lacks the handle each graph gets
    /// its own pool.
    /// </remarks>
    /// <exception cref="InvalidOperationException">Graphs are unavailable.</exception>
    public static CudaGraph[] CaptureAll(Device device, int count, Action<int> warmUp, Action<int> record)
    {
        ArgumentNullException.ThrowIfNull(device);
        ArgumentNullException.ThrowIfNull(warmUp);
        ArgumentNullException.ThrowIfNull(record);
        var api = Api.Value ?? throw new InvalidOperationException($"CUDA graphs are unavailable: {UnavailableReason}.");
        var index = (sbyte)Math.Max(device.index, 0);
        var graphs = new List<CudaGraph>(count);
        var pool = api.NewPool();
        cuda.synchronize(device);
        var previous = api.CurrentStream(index);
        api.SetCurrentStream(api.StreamFromPool(0, index));
        try
        {
            for (var i = 0; i < count; i++)
            {
                warmUp(i);
            }
            cuda.synchronize(device);
            for (var i = 0; i < count; i++)
            {
                var graph = new CudaGraph(api);
                graphs.Add(graph);
                api.CaptureBegin(graph._object, pool.First, pool.Second, CaptureModeThreadLocal);
                try
                {
                    record(i);
                }
                catch (Exception error)
                {
                    // Ending an invalidated capture throws a C++ exception, which ends the process: say why first.
                    Console.Error.WriteLine($"CUDA graph capture of segment {i} failed: {error.Message}");
                    throw;
                }
                finally
                {
                    api.CaptureEnd(graph._object);
                }
            }
        }
        catch
        {
            foreach (var graph in graphs)
            {
                graph.Dispose();
            }
            throw;
        }
        finally
        {
            api.SetCurrentStream(previous);
            cuda.synchronize(device);
        }
        return [.. graphs];
    }

    /// <summary>Launches the captured work on the calling thread's current stream.</summary>
    public void Replay()
    {
        ObjectDisposedException.ThrowIf(_object is null, this);
        Api.Value!.Replay(_object);
    }

    /// <inheritdoc/>
    public void Dispose()
    {
        if (_object is null)
        {
            return;
        }
        // The destructor resets the graph and returns its private pool to the allocator.
        Api.Value!.Destruct(_object);
        NativeMemory.Free(_object);
        _object = null;
    }

    private static Entries? Resolve()
    {
        var graphs = AtenShim.LoadedLibrary("libtorch_cuda.so");
        var streams = AtenShim.LoadedLibrary("libc10_cuda.so");
        if (graphs == 0 || streams == 0)
        {
            return null;
        }
        nint Find(nint library, params string[] names)
        {
            foreach (var name in names)
            {
                if (NativeLibrary.TryGetExport(library, name, out var address))
                {
                    return address;
                }
            }
            MissingSymbol ??= names[0];
            return 0;
        }
        // Optional: without it every graph gets a private pool.
        _ = NativeLibrary.TryGetExport(graphs, "_ZN2at4cuda17graph_pool_handleEv", out var poolHandle);
        var entries = new Entries(
            (delegate* unmanaged<void*, byte, void>)Find(graphs, "_ZN2at4cuda9CUDAGraphC1Eb", "_ZN2at4cuda9CUDAGraphC1Ev"),
            (delegate* unmanaged<void*, void>)Find(graphs, "_ZN2at4cuda9CUDAGraphD1Ev"),
            (delegate* unmanaged<void*, ulong, ulong, int, void>)Find(graphs, "_ZN2at4cuda9CUDAGraph13capture_beginESt4pairIyyE21cudaStreamCaptureMode"),
            (delegate* unmanaged<void*, void>)Find(graphs, "_ZN2at4cuda9CUDAGraph11capture_endEv"),
            (delegate* unmanaged<void*, void>)Find(graphs, "_ZN2at4cuda9CUDAGraph6replayEv"),
            (delegate* unmanaged<byte, sbyte, CudaStream>)Find(streams, "_ZN3c104cuda17getStreamFromPoolEba"),
            (delegate* unmanaged<sbyte, CudaStream>)Find(streams, "_ZN3c104cuda20getCurrentCUDAStreamEa"),
            (delegate* unmanaged<CudaStream, void>)Find(streams, "_ZN3c104cuda20setCurrentCUDAStreamENS0_10CUDAStreamE"),
            (delegate* unmanaged<MempoolId>)poolHandle);
        return MissingSymbol is null ? entries : null;
    }

    /// <summary><c>c10::cuda::CUDAStream</c> by value: a <c>c10::Stream</c> (device type and index, then the stream id).</summary>
    [StructLayout(LayoutKind.Sequential)]
    private readonly struct CudaStream
    {
        private readonly ulong _device;
        private readonly ulong _id;
    }

    /// <summary><c>at::cuda::MempoolId_t</c> by value: a pair of 64-bit ids; (0, 0) asks for a private pool.</summary>
    [StructLayout(LayoutKind.Sequential)]
    private readonly record struct MempoolId(ulong First, ulong Second);

    private sealed class Entries(
        delegate* unmanaged<void*, byte, void> construct,
        delegate* unmanaged<void*, void> destruct,
        delegate* unmanaged<void*, ulong, ulong, int, void> captureBegin,
        delegate* unmanaged<void*, void> captureEnd,
        delegate* unmanaged<void*, void> replay,
        delegate* unmanaged<byte, sbyte, CudaStream> streamFromPool,
        delegate* unmanaged<sbyte, CudaStream> currentStream,
        delegate* unmanaged<CudaStream, void> setCurrentStream,
        delegate* unmanaged<MempoolId> graphPoolHandle)
    {
        public MempoolId NewPool() => graphPoolHandle is null ? default : graphPoolHandle();
        public void Construct(void* graph, byte keepGraph) => construct(graph, keepGraph);
        public void Destruct(void* graph) => destruct(graph);
        public void CaptureBegin(void* graph, ulong poolFirst, ulong poolSecond, int mode) => captureBegin(graph, poolFirst, poolSecond, mode);
        public void CaptureEnd(void* graph) => captureEnd(graph);
        public void Replay(void* graph) => replay(graph);
        public CudaStream StreamFromPool(byte highPriority, sbyte device) => streamFromPool(highPriority, device);
        public CudaStream CurrentStream(sbyte device) => currentStream(device);
        public void SetCurrentStream(CudaStream stream) => setCurrentStream(stream);
    }
}

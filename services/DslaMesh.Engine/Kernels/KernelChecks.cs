using System.Text.Json.Serialization;
using static TorchSharp.torch;

namespace DslaMesh.Engine.Kernels;

/// <summary>One kernel-versus-reference comparison.</summary>
public sealed record KernelCheck(
    string Kernel,
    string Case,
    [property: JsonPropertyName("dtype")] string DType,
    double MaxAbsError,
    double Tolerance,
    bool CacheWritten,
    bool Passed);

/// <summary>
/// Checks the engine's CUDA kernels (decode attention, decode GEMV, RMS norm) against their plain-tensor references
/// across shapes, batch sizes, odd lengths, GQA groups, strided inputs and dtypes (the GPU test category: <c>dslactl kernels check</c> on a CUDA host).
/// </summary>
public static class KernelChecks
{
    /// <summary>Largest |kernel − reference| allowed, per dtype (the reference is computed in fp32).</summary>
    public static double Tolerance(ScalarType dtype) => dtype switch
    {
        ScalarType.Float32 => 1e-4,
        ScalarType.Float16 => 4e-3,
        _ => 2e-2,
    };

    private static readonly ScalarType[] DTypes = [ScalarType.BFloat16, ScalarType.Float16, ScalarType.Float32];

    /// <summary>Runs every case on <paramref name="device"/> (CUDA). <paramref name="progress"/> receives each result.</summary>
    /// <exception cref="InvalidOperationException">The device is not CUDA or the kernels are unavailable.</exception>
    public static IReadOnlyList<KernelCheck> DecodeAttentionCases(Device device, Action<KernelCheck>? progress = null)
    {
        var shapes = new (int Rows, int KvHeads, int Group, int HeadDim)[]
        {
            (1, 32, 1, 128), (3, 2, 4, 64), (2, 4, 8, 128), (5, 1, 2, 16), (1, 2, 1, 256), (4, 8, 3, 32), (2, 1, 1, 8),
        };
        return Run(device, progress, firstSeed: 0,
            from dtype in DTypes
            from shape in shapes
            from length in new[] { 0, 1, 31, 200, 1000, 4097 }
            from layout in new[] { "fused", "batch-rows", "fused rope", "batch-rows rope" }
            // e.g. fp32 rows of 256 × 4 bytes: more than one warp per key row
            where DecodeAttention.Unsupported(dtype, device.type, shape.KvHeads * shape.Group, shape.KvHeads, shape.HeadDim) is null
            select (Func<long, KernelCheck>)(seed => DecodeAttentionCase(dtype, shape.Rows, shape.KvHeads, shape.Group, shape.HeadDim, length, layout, device, seed)));
    }

    /// <summary>
    /// Runs the GEMV cases on <paramref name="device"/> (CUDA): every epilogue, 1–8 rows, odd sizes, strided rows, each
    /// with and without the RMS norm fused in front.
    /// </summary>
    public static IReadOnlyList<KernelCheck> DecodeGemvCases(Device device, Action<KernelCheck>? progress = null) =>
        Run(device, progress, firstSeed: 1000,
            from dtype in DTypes
            from rows in new[] { 1, 3, 8 }
            from size in new[] { (N: 100, K: 64), (N: 4096, K: 4096), (N: 37, K: 1008) }
            from epilogue in Enum.GetValues<GemvEpilogue>()
            from normed in new[] { false, true }
            select (Func<long, KernelCheck>)(seed => DecodeGemvCase(dtype, rows, size.N, size.K, epilogue, normed, device, seed)));

    /// <summary>Runs the RMS norm cases on <paramref name="device"/> (CUDA): 1–17 rows, widths from one vector to 8 per thread, strided rows.</summary>
    public static IReadOnlyList<KernelCheck> RmsNormCases(Device device, Action<KernelCheck>? progress = null) =>
        Run(device, progress, firstSeed: 2000,
            from dtype in DTypes
            from rows in new[] { 1, 3, 17 }
            from size in new[] { 8, 200, 4096, 5120, 8200 }
            where RmsNormKernel.UnsupportedShape(dtype, size) is null
            from strided in new[] { false, true }
            select (Func<long, KernelCheck>)(seed => RmsNormCase(dtype, rows, size, strided, device, seed)));

    /// <summary>Runs the cases in order, each with the next seed from <paramref name="firstSeed"/>, reporting each result.</summary>
    private static List<KernelCheck> Run(Device device, Action<KernelCheck>? progress, long firstSeed, IEnumerable<Func<long, KernelCheck>> cases)
    {
        RequireCuda(device);
        var results = new List<KernelCheck>();
        var seed = firstSeed;
        foreach (var check in cases.Select(run => run(seed++)))
        {
            results.Add(check);
            progress?.Invoke(check);
        }
        return results;
    }

    private static KernelCheck RmsNormCase(ScalarType dtype, int rows, int size, bool strided, Device device, long seed)
    {
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        var generator = new TorchSharp.torch.Generator((ulong)seed);
        Tensor Random(long[] shape) => randn(shape, generator: generator).to(device);
        // Strided: every other row of a larger buffer, as rows of a wider activation are.
        var x = strided ? Random([rows, 2, size]).mul(3.0).to(dtype).select(1, 0) : Random([rows, size]).mul(3.0).to(dtype);
        var weight = (Random([size]) * 0.5 + 1.0).to(dtype);
        var expected = RmsNormKernel.Reference(x, weight, 1e-5).to(ScalarType.Float32);
        var output = RmsNormKernel.Run(x, weight, 1e-5);
        // Relative to max(1, |expected|): the reference rounds the same way, and only the order of the fp32 sum differs
        // (so, rarely, one rounding of a value that may be well above 1).
        var error = ((output.to(ScalarType.Float32) - expected).abs() / expected.abs().clamp_min(1.0)).max().item<float>();
        var tolerance = Tolerance(dtype);
        return new KernelCheck("rms_norm", $"rows={rows} D={size}{(strided ? " strided" : "")}", dtype.ToString().ToLowerInvariant(), error, tolerance, true, error <= tolerance);
    }

    /// <summary>One GEMV case; <paramref name="normed"/>: x goes through the fused RMS norm (reference: <see cref="RmsNormKernel.Reference"/>).</summary>
    private static KernelCheck DecodeGemvCase(ScalarType dtype, int rows, int n, int k, GemvEpilogue epilogue, bool normed, Device device, long seed)
    {
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        var generator = new TorchSharp.torch.Generator((ulong)seed);
        Tensor Random(long[] shape) => randn(shape, generator: generator).to(device);
        // x as every other row of a larger buffer: rows a stride apart, as a narrowed projection output is.
        var x = (Random([rows, 2, k]) * (normed ? 3 : 1)).to(dtype).select(1, 0);
        var weight = (Random([epilogue == GemvEpilogue.SiluGate ? 2 * n : n, k]) / Math.Sqrt(k)).to(dtype);
        const double Eps = 1e-5;
        var gains = normed ? (1 + (0.2 * Random([k]))).to(dtype) : null;
        var input = gains is null ? x : RmsNormKernel.Reference(x, gains, Eps);
        var product = matmul(input.to(ScalarType.Float32), weight.to(ScalarType.Float32).t());
        var output = Random([rows, n]).to(dtype);
        var expected = epilogue switch
        {
            GemvEpilogue.AddInto => output.to(ScalarType.Float32) + product,
            GemvEpilogue.SiluGate => nn.functional.silu(product.narrow(1, 0, n)) * product.narrow(1, n, n),
            _ => product,
        };
        DecodeGemv.Run(x, weight, output, epilogue, gains is null ? null : (gains, Eps));
        var error = (output.to(ScalarType.Float32) - expected).abs().max().item<float>();
        var tolerance = 1.5 * Tolerance(dtype);
        return new KernelCheck("decode_gemv", $"rows={rows} N={n} K={k} {epilogue}{(normed ? " +norm" : "")}", dtype.ToString().ToLowerInvariant(), error, tolerance, true, error <= tolerance);
    }

    private static void RequireCuda(Device device)
    {
        ArgumentNullException.ThrowIfNull(device);
        if (device.type != TorchSharp.DeviceType.CUDA)
        {
            throw new InvalidOperationException($"The kernel checks need a CUDA device (got {device}); run them on a GPU host: dslactl kernels check --device cuda.");
        }
        if (!CudaKernels.IsAvailable)
        {
            throw new InvalidOperationException($"CUDA kernels are unavailable: {CudaKernels.UnavailableReason}.");
        }
    }

    /// <summary>
    /// One case: q, k, v as views of one fused projection [B, H + 2·Hkv, d] (the engine's layout), caches either each
    /// case's own [B, Hkv, capacity, d] ("fused") or B rows in the middle of a larger batch ("batch-rows"); with "rope",
    /// q and k arrive unrotated with RoPE tables for the kernel to apply.
    /// </summary>
    private static KernelCheck DecodeAttentionCase(ScalarType dtype, int rows, int kvHeads, int group, int headDim, int length, string layout, Device device, long seed)
    {
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        // Inputs come from a seeded CPU generator (TorchSharp's generators live on the CPU), then move to the device.
        var generator = new TorchSharp.torch.Generator((ulong)seed);
        Tensor Random(long[] shape) => randn(shape, generator: generator).to(device);
        var heads = kvHeads * group;
        var capacity = length + 5;
        var projection = Random([rows, heads + (2 * kvHeads), headDim]).to(dtype);
        var q = projection.narrow(1, 0, heads);
        var kNew = projection.narrow(1, heads, kvHeads);
        var vNew = projection.narrow(1, heads + kvHeads, kvHeads);
        var (batchRows, first) = layout == "batch-rows" ? (rows + 3, 2) : (rows, 0);
        var keyStorage = Random([batchRows, kvHeads, capacity, headDim]).to(dtype);
        var valueStorage = Random([batchRows, kvHeads, capacity, headDim]).to(dtype);
        var keys = keyStorage.narrow(0, first, rows);
        var values = valueStorage.narrow(0, first, rows);
        var referenceKeys = keys.clone();
        var referenceValues = values.clone();
        // RoPE tables [B, d] as the model builds them: the same angles in both halves.
        var angles = layout.EndsWith("rope", StringComparison.Ordinal) ? Random([rows, headDim / 2]).mul(3.0).repeat(1, 2) : null;
        var (cos, sin) = angles is null ? (null, null) : (angles.cos().to(dtype), angles.sin().to(dtype));

        var expected = DecodeAttention.Reference(q, kNew, vNew, referenceKeys, referenceValues, length, cos, sin);
        var output = empty([rows, 1, heads * headDim], dtype: dtype, device: device).view(rows, heads, headDim);
        DecodeAttention.Run(q, kNew, vNew, keys, values, length, output, cos, sin);

        var error = (output.to(ScalarType.Float32) - expected).abs().max().item<float>();
        var tolerance = Tolerance(dtype);
        // Without RoPE the cache must receive exactly kNew/vNew; with it, the rotated key up to rounding order.
        var written = angles is null
            ? keys.eq(referenceKeys).all().item<bool>() && values.eq(referenceValues).all().item<bool>()
            : (keys.to(ScalarType.Float32) - referenceKeys.to(ScalarType.Float32)).abs().max().item<float>() <= tolerance && values.eq(referenceValues).all().item<bool>();
        var name = $"B={rows} Hkv={kvHeads} group={group} d={headDim} length={length} {layout}";
        return new KernelCheck("decode_attention", name, dtype.ToString().ToLowerInvariant(), error, tolerance, written, written && error <= tolerance);
    }
}

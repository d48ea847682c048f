using System.Globalization;
using TorchSharp;
using static TorchSharp.torch;

namespace DslaMesh.Engine.Kernels;

/// <summary>
/// Softmax attention of one new token per sequence over its KV cache, with RoPE applied to the new query and key and the
/// new key and value appended, as one kernel launch (<c>decode_attention.cu</c>): the decode step's attention core,
/// which would otherwise take three RoPE kernels, two cache copies, an SDPA call (FlashAttention's split and combine
/// kernels) and a layout copy.
/// </summary>
/// <remarks>
/// <para>
/// Shapes: q [B, Hq, d], kNew and vNew [B, Hkv, d], key and value caches [B, Hkv, capacity, d] with the
/// last two dimensions contiguous (rows may be any stride apart: a <see cref="Inference.KvBatch"/>'s rows, or one
/// sequence's own storage), output [B, Hq, d]; the innermost dimension contiguous everywhere. Query head h reads KV
/// head h / (Hq / Hkv), as Hugging Face's <c>repeat_kv</c> does. Positions [0, length) of every row's cache are valid;
/// the call writes the new key and value at position <c>length</c> and attends over [0, length]. With RoPE tables cos and
/// sin [B, d] (the new token's, Hugging Face's layout), q and kNew arrive unrotated and the kernel rotates both; the
/// cache receives the rotated key.
/// </para>
/// <para>
/// The keys are split across thread blocks (flash-decoding): enough splits to give every multiprocessor two blocks,
/// 32–512 keys each; with more than one split, the last block of each (row, KV head) to finish merges the partial
/// softmax results (counted in a small per-thread buffer of arrivals that the merging block zeroes again). Arithmetic
/// is fp32.
/// </para>
/// </remarks>
public static unsafe class DecodeAttention
{
    private const string Source = "decode_attention.cu";
    private const int MaxGroup = 8;
    private const int MinKeysPerSplit = 32;
    private const int MaxKeysPerSplit = 1024;
    private const long BlocksPerMultiprocessor = 2;

    private static readonly System.Collections.Concurrent.ConcurrentDictionary<(ScalarType DType, long HeadDim, long Group, int Device), nint> Compiled = new();

    [ThreadStatic]
    private static Tensor? _workspace;

    // Split arrivals per (row, KV head): zero between launches (each launch's merging blocks leave them zero).
    [ThreadStatic]
    private static Tensor? _arrivals;

    /// <summary>
    /// Why the kernel cannot serve these operands (null when it can): CUDA and NVRTC present, a 16-bit or fp32 dtype
    /// shared by all, a head dimension whose rows are whole 16-byte vectors (d·size ∈ 16…512 bytes, a power of two), at
    /// most 8 query heads per KV head.
    /// </summary>
    public static string? Unsupported(Tensor q, Tensor kNew)
    {
        ArgumentNullException.ThrowIfNull(q);
        ArgumentNullException.ThrowIfNull(kNew);
        return Unsupported(q.dtype, q.device_type, q.shape[1], kNew.shape[1], q.shape[^1]);
    }

    /// <summary>
    /// <see cref="Unsupported(Tensor, Tensor)"/> for a model's shapes: why its decode steps cannot use the kernel, or
    /// null when they can. Fixed per model, so callers decide once.
    /// </summary>
    public static string? Unsupported(ScalarType dtype, DeviceType deviceType, long queryHeads, long kvHeads, long headDim) =>
        CudaKernels.UnavailableOn(deviceType) ?? UnsupportedShape(dtype, queryHeads, kvHeads, headDim);

    /// <summary>The dtype and shape part of <see cref="Unsupported(ScalarType, DeviceType, long, long, long)"/> (no device needed).</summary>
    public static string? UnsupportedShape(ScalarType dtype, long queryHeads, long kvHeads, long headDim)
    {
        if (dtype is not (ScalarType.BFloat16 or ScalarType.Float16 or ScalarType.Float32))
        {
            return $"dtype {dtype}";
        }
        var rowBytes = headDim * (dtype == ScalarType.Float32 ? 4 : 2);
        var lanes = rowBytes / 16;
        if (rowBytes % 16 != 0 || lanes < 1 || lanes > 32 || (lanes & (lanes - 1)) != 0)
        {
            return $"head dimension {headDim} ({rowBytes} bytes per row)";
        }
        var group = kvHeads < 1 ? 0 : queryHeads / kvHeads;
        return group is < 1 or > MaxGroup ? $"{group} query heads per KV head" : null;
    }

    /// <summary>
    /// Compiles (or loads from the disk cache) the kernels a model with these shapes will launch, so that the first
    /// decode step does not pay for it. A no-op where <see cref="Unsupported(ScalarType, DeviceType, long, long, long)"/> names a reason.
    /// </summary>
    public static void Prepare(ScalarType dtype, long queryHeads, long kvHeads, long headDim, Device device)
    {
        ArgumentNullException.ThrowIfNull(device);
        if (Unsupported(dtype, device.type, queryHeads, kvHeads, headDim) is not null)
        {
            return;
        }
        _ = Kernel(dtype, headDim, queryHeads / kvHeads, (int)Math.Max(device.index, 0));
    }

    /// <summary>
    /// Appends kNew/vNew at <paramref name="length"/> and writes the attention of q over [0, length] into
    /// <paramref name="output"/>; with <paramref name="cos"/> and <paramref name="sin"/> [B, d], rotates q and kNew first.
    /// </summary>
    /// <exception cref="ArgumentException">Shapes, dtypes, devices, strides or alignment do not fit (the message says which).</exception>
    public static void Run(Tensor q, Tensor kNew, Tensor vNew, Tensor keyCache, Tensor valueCache, int length, Tensor output, Tensor? cos = null, Tensor? sin = null)
    {
        var (b, hq, hkv, d, pointers) = Validate(q, kNew, vNew, keyCache, valueCache, length, output, cos, sin);
        var (cosPointer, sinPointer) = cos is null ? (0L, 0L) : (CudaKernels.DataPointer(cos), CudaKernels.DataPointer(sin!));
        var ropeBatch = cos?.stride(0) ?? 0L;
        var device = (int)Math.Max(q.device_index, 0);
        var (keysPerSplit, splits) = Splits(length + 1, b, hkv, CudaKernels.MultiprocessorCount(device));
        var attention = Kernel(q.dtype, d, hq / hkv, device);
        long partialOut = 0L, partialStats = 0L, arrivals = 0L;
        if (splits > 1)
        {
            var slots = b * hq * splits;
            partialOut = CudaKernels.DataPointer(Workspace(ref _workspace, slots * (d + 2), ScalarType.Float32, q.device));
            partialStats = partialOut + (slots * d * sizeof(float));
            arrivals = CudaKernels.DataPointer(Workspace(ref _arrivals, b * hkv, ScalarType.Int32, q.device));
        }

        long qPointer = pointers[0], kPointer = pointers[1], vPointer = pointers[2];
        long keysPointer = pointers[3], valuesPointer = pointers[4], outPointer = pointers[5];
        long qBatch = q.stride(0), qHead = q.stride(1), kBatch = kNew.stride(0), kHead = kNew.stride(1), vBatch = vNew.stride(0), vHead = vNew.stride(1);
        long cacheBatch = keyCache.stride(0), cacheHead = keyCache.stride(1), outBatch = output.stride(0), outHead = output.stride(1);
        var scaleLog2 = (float)(1.0 / Math.Sqrt(d) * 1.4426950408889634);
        var kv = keysPerSplit;
        var arguments = stackalloc void*[]
        {
            &qPointer, &qBatch, &qHead,
            &kPointer, &kBatch, &kHead,
            &vPointer, &vBatch, &vHead,
            &keysPointer, &valuesPointer, &cacheBatch, &cacheHead,
            &length, &kv, &scaleLog2,
            &cosPointer, &sinPointer, &ropeBatch,
            &partialOut, &partialStats, &arrivals,
            &outPointer, &outBatch, &outHead,
        };
        CudaKernels.Launch(attention, ((uint)splits, (uint)hkv, (uint)b), 128, device, arguments);
        GC.KeepAlive(q);
        GC.KeepAlive(kNew);
        GC.KeepAlive(vNew);
        GC.KeepAlive(keyCache);
        GC.KeepAlive(valueCache);
        GC.KeepAlive(output);
        GC.KeepAlive(cos);
        GC.KeepAlive(sin);
    }

    /// <summary>
    /// Keys per block and blocks per (row, KV head) for <paramref name="keys"/> keys: two blocks per multiprocessor where
    /// the keys allow, each reading a multiple of 32 keys between 32 and 1024.
    /// </summary>
    /// <remarks>
    /// Measured on an NVIDIA H200 (bf16, head size 128, 8 key rows in flight per lane; <c>deploy/gpu/kernel_bench.py</c>'s
    /// sweep, 2026-12-02): the rule picks the fastest of 64–4096 keys per split, or within 2 %, at batch 1 with 32 KV
    /// heads (1k: 128 keys, 8.2 µs; 4k: 512, 23.4 µs; 16k: 1024, 69.1 µs, where 512 took 71.5 and 2048 72.0), with GQA
    /// (8 KV heads × 4, 4k: 128, 23.6 µs; 16k: 512, 54.3 µs) and at batch 4–8 (4k × 8: 1024, 128.7 µs; 16k × 4: 1024,
    /// 244.5 µs against 242.7 at best). Shorter splits than the rule's cost more to merge than they add in parallelism.
    /// </remarks>
    public static (int KeysPerSplit, int Splits) Splits(long keys, long rows, long kvHeads, int multiprocessors)
    {
        ArgumentOutOfRangeException.ThrowIfLessThan(keys, 1);
        var target = BlocksPerMultiprocessor * Math.Max(multiprocessors, 1);
        var perSplit = (keys * rows * kvHeads + target - 1) / target;
        perSplit = Math.Clamp((perSplit + 31) / 32 * 32, MinKeysPerSplit, MaxKeysPerSplit);
        return ((int)perSplit, (int)((keys + perSplit - 1) / perSplit));
    }

    /// <summary>
    /// The same result with plain tensor ops (any device): rotates q and kNew when <paramref name="cos"/> and
    /// <paramref name="sin"/> [B, d] are given (as the model's LibTorch path does), writes kNew/vNew into the caches at
    /// <paramref name="length"/> and returns attention [B, Hq, d] over [0, length], computed and returned in fp32. What
    /// the kernel is checked against.
    /// </summary>
    public static Tensor Reference(Tensor q, Tensor kNew, Tensor vNew, Tensor keyCache, Tensor valueCache, int length, Tensor? cos = null, Tensor? sin = null)
    {
        ArgumentNullException.ThrowIfNull(q);
        ArgumentNullException.ThrowIfNull(kNew);
        ArgumentNullException.ThrowIfNull(vNew);
        ArgumentNullException.ThrowIfNull(keyCache);
        ArgumentNullException.ThrowIfNull(valueCache);
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        var (b, hq, hkv, d) = (q.shape[0], q.shape[1], kNew.shape[1], q.shape[2]);
        if (cos is not null && sin is not null)
        {
            // [B, 1, d] tables against [B, H, d]; sin with rotate_half's sign folded in, as the model's fused path rotates.
            var (cosRows, sinRows) = (cos.unsqueeze(1), sin.unsqueeze(1));
            var sinSigned = cat([-sinRows.narrow(-1, 0, d / 2), sinRows.narrow(-1, d / 2, d / 2)], -1);
            q = Models.RotaryEmbedding.ApplyRolled(q, q.roll(d / 2, -1), cosRows, sinSigned);
            kNew = Models.RotaryEmbedding.ApplyRolled(kNew, kNew.roll(d / 2, -1), cosRows, sinSigned);
        }
        keyCache.narrow(2, length, 1).copy_(kNew.unsqueeze(2));
        valueCache.narrow(2, length, 1).copy_(vNew.unsqueeze(2));
        var keys = keyCache.narrow(2, 0, length + 1).to(ScalarType.Float32);
        var values = valueCache.narrow(2, 0, length + 1).to(ScalarType.Float32);
        // [B, Hkv, group, d]: the group's query heads as the query axis.
        var grouped = q.to(ScalarType.Float32).reshape(b, hkv, hq / hkv, d);
        var result = nn.functional.scaled_dot_product_attention(grouped, keys, values);
        return result.reshape(b, hq, d).MoveToOuterDisposeScope();
    }

    /// <summary>Checks the operands; returns the shape and the data pointers of q, kNew, vNew, the caches and output, in that order.</summary>
    private static (long B, long Hq, long Hkv, long D, long[] Pointers) Validate(Tensor q, Tensor kNew, Tensor vNew, Tensor keyCache, Tensor valueCache, int length, Tensor output, Tensor? cos, Tensor? sin)
    {
        ArgumentNullException.ThrowIfNull(q);
        ArgumentNullException.ThrowIfNull(kNew);
        ArgumentNullException.ThrowIfNull(vNew);
        ArgumentNullException.ThrowIfNull(keyCache);
        ArgumentNullException.ThrowIfNull(valueCache);
        ArgumentNullException.ThrowIfNull(output);
        if (q.dim() != 3 || kNew.dim() != 3 || vNew.dim() != 3 || output.dim() != 3 || keyCache.dim() != 4 || valueCache.dim() != 4)
        {
            throw new ArgumentException($"Decode attention takes q, kNew, vNew, output [B, H, d] and caches [B, Hkv, capacity, d]; got q {CudaKernels.Shape(q)}, kNew {CudaKernels.Shape(kNew)}, vNew {CudaKernels.Shape(vNew)}, caches {CudaKernels.Shape(keyCache)} {CudaKernels.Shape(valueCache)}, output {CudaKernels.Shape(output)}.");
        }
        var (b, hq, d) = (q.shape[0], q.shape[1], q.shape[2]);
        var hkv = kNew.shape[1];
        if (!kNew.shape.SequenceEqual(new[] { b, hkv, d }) || !vNew.shape.SequenceEqual(kNew.shape) || !output.shape.SequenceEqual(q.shape)
            || !keyCache.shape.SequenceEqual(valueCache.shape) || keyCache.shape[0] != b || keyCache.shape[1] != hkv || keyCache.shape[3] != d)
        {
            throw new ArgumentException($"Inconsistent decode attention shapes: q {CudaKernels.Shape(q)}, kNew {CudaKernels.Shape(kNew)}, vNew {CudaKernels.Shape(vNew)}, caches {CudaKernels.Shape(keyCache)} {CudaKernels.Shape(valueCache)}, output {CudaKernels.Shape(output)}.");
        }
        if (hkv < 1 || hq % hkv != 0)
        {
            throw new ArgumentException($"Query heads ({hq}) must be a multiple of KV heads ({hkv}).", nameof(q));
        }
        ValidateRope(cos, sin, q, b, d);
        ArgumentOutOfRangeException.ThrowIfNegative(length);
        if (length >= keyCache.shape[2])
        {
            throw new ArgumentException($"The caches hold {keyCache.shape[2]} positions; appending at position {length} needs one more.", nameof(keyCache));
        }
        foreach (var (name, tensor) in new[] { ("kNew", kNew), ("vNew", vNew), ("keyCache", keyCache), ("valueCache", valueCache), ("output", output) })
        {
            if (tensor.dtype != q.dtype || tensor.device_type != q.device_type || tensor.device_index != q.device_index)
            {
                throw new ArgumentException($"{name} is {tensor.dtype} on {tensor.device}; q is {q.dtype} on {q.device}.", name);
            }
        }
        if (Unsupported(q, kNew) is { } reason)
        {
            throw new ArgumentException($"The decode attention kernel does not support these operands: {reason}.", nameof(q));
        }
        if (keyCache.stride(0) != valueCache.stride(0) || keyCache.stride(1) != valueCache.stride(1) || keyCache.stride(2) != d || keyCache.stride(3) != 1 || valueCache.stride(2) != d || valueCache.stride(3) != 1)
        {
            throw new ArgumentException($"The caches must be contiguous in their last two dimensions and share strides; got [{string.Join(", ", keyCache.stride())}] and [{string.Join(", ", valueCache.stride())}].", nameof(keyCache));
        }
        var operands = new[] { ("q", q), ("kNew", kNew), ("vNew", vNew), ("keyCache", keyCache), ("valueCache", valueCache), ("output", output) };
        var pointers = new long[operands.Length];
        for (var i = 0; i < operands.Length; i++)
        {
            var (name, tensor) = operands[i];
            var strides = tensor.stride();
            var element = tensor.ElementSize;
            pointers[i] = CudaKernels.DataPointer(tensor);
            if (strides[^1] != 1 || strides.Take(strides.Length - 1).Any(s => s * element % 16 != 0) || pointers[i] % 16 != 0)
            {
                throw new ArgumentException($"{name} must have a contiguous last dimension, 16-byte aligned rows and a 16-byte aligned start; strides [{string.Join(", ", strides)}].", name);
            }
        }
        return (b, hq, hkv, d, pointers);
    }

    /// <summary>Checks the RoPE tables: both or neither; [B, d] in q's dtype and on its device, contiguous in d, one batch stride.</summary>
    private static void ValidateRope(Tensor? cos, Tensor? sin, Tensor q, long b, long d)
    {
        if (cos is null && sin is null)
        {
            return;
        }
        if (cos is null || sin is null)
        {
            throw new ArgumentException("RoPE needs both cos and sin (or neither).", cos is null ? nameof(cos) : nameof(sin));
        }
        if (!cos.shape.SequenceEqual(new[] { b, d }) || !sin.shape.SequenceEqual(cos.shape))
        {
            throw new ArgumentException($"RoPE tables must be [B, d] = [{b}, {d}]; got cos {CudaKernels.Shape(cos)}, sin {CudaKernels.Shape(sin)}.", nameof(cos));
        }
        if (cos.dtype != q.dtype || sin.dtype != q.dtype || cos.device_type != q.device_type || cos.device_index != q.device_index || sin.device_index != q.device_index)
        {
            throw new ArgumentException($"RoPE tables are {cos.dtype}/{sin.dtype} on {cos.device}/{sin.device}; q is {q.dtype} on {q.device}.", nameof(cos));
        }
        if (cos.stride(1) != 1 || sin.stride(1) != 1 || cos.stride(0) != sin.stride(0))
        {
            throw new ArgumentException($"RoPE tables must be contiguous in d and share a batch stride; got [{string.Join(", ", cos.stride())}] and [{string.Join(", ", sin.stride())}].", nameof(cos));
        }
        if (d % 2 != 0)
        {
            throw new ArgumentException($"RoPE needs an even head dimension; got {d}.", nameof(cos));
        }
    }

    /// <summary>The attention kernel for a dtype, head size and GQA group on a device (compiled on first use).</summary>
    private static nint Kernel(ScalarType dtype, long headDim, long group, int device) =>
        Compiled.GetOrAdd((dtype, headDim, group, device), key =>
        {
            var defines = new[]
            {
                ("HEAD_DIM", key.HeadDim.ToString(CultureInfo.InvariantCulture)),
                ("GROUP", key.Group.ToString(CultureInfo.InvariantCulture)),
                ("SCALAR_KIND", CudaKernels.ScalarKind(key.DType)),
            };
            return CudaKernels.Function(Source, "decode_attention", defines, key.Device);
        });

    /// <summary>A per-thread scratch buffer of at least <paramref name="elements"/> (zeroed when allocated), reused across launches.</summary>
    private static Tensor Workspace(ref Tensor? cached, long elements, ScalarType dtype, Device device)
    {
        var workspace = cached;
        if (workspace is null || workspace.IsInvalid || workspace.NumberOfElements < elements || workspace.device_index != device.index)
        {
            workspace?.Dispose();
            workspace = zeros(Math.Max(elements, 1L << (dtype == ScalarType.Float32 ? 20 : 12)), dtype: dtype, device: device).DetachFromDisposeScope();
            cached = workspace;
        }
        return workspace;
    }
}

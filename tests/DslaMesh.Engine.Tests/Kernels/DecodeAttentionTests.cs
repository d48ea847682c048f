using DslaMesh.Engine.Backends;
using DslaMesh.Engine.Kernels;
using DslaMesh.Engine.Models;
using static TorchSharp.torch;

namespace DslaMesh.Engine.Tests.Kernels;

/// <summary>
/// The decode attention kernel's host side on CPU: grid sizing, operand checks and the plain-tensor reference the GPU
/// check (<c>dslactl kernels check</c>, run on a CUDA host) compares the kernel with.
/// </summary>
public sealed class DecodeAttentionTests
{
    [Theory]
    [InlineData(1, 1, 32, 132)]
    [InlineData(1025, 1, 32, 132)]
    [InlineData(16385, 1, 32, 132)]
    [InlineData(4097, 8, 32, 132)]
    [InlineData(70, 3, 2, 16)]
    [InlineData(100_000, 64, 8, 132)]
    public void Splits_cover_every_key_once_in_blocks_of_32_to_1024(long keys, long rows, long kvHeads, int multiprocessors)
    {
        var (perSplit, splits) = DecodeAttention.Splits(keys, rows, kvHeads, multiprocessors);

        Assert.InRange(perSplit, 32, 1024);
        Assert.Equal(0, perSplit % 32);
        Assert.True((long)perSplit * splits >= keys, "the splits miss keys");
        Assert.True((long)perSplit * (splits - 1) < keys, "the last split is empty");
        var blocks = rows * kvHeads * splits;
        // At least one block per multiprocessor whenever 32-key splits could make two per multiprocessor.
        if (rows * kvHeads * ((keys + 31) / 32) >= 2 * multiprocessors)
        {
            Assert.True(blocks >= multiprocessors, $"{blocks} blocks for {multiprocessors} multiprocessors");
        }
    }

    [Theory]   // the fastest split lengths of kernel_bench's sweep on an H200 (132 multiprocessors), 2026-12-02
    [InlineData(1025, 1, 32, 128)]
    [InlineData(4097, 1, 32, 512)]
    [InlineData(16385, 1, 32, 1024)]
    [InlineData(4097, 1, 8, 128)]
    [InlineData(16385, 1, 8, 512)]
    [InlineData(4097, 8, 32, 1024)]
    public void Splits_pick_the_measured_best_on_an_H200(long keys, long rows, long kvHeads, int expectedKeysPerSplit) =>
        Assert.Equal(expectedKeysPerSplit, DecodeAttention.Splits(keys, rows, kvHeads, 132).KeysPerSplit);

    [Fact]
    public void Splits_reject_an_empty_cache() =>
        Assert.Throws<ArgumentOutOfRangeException>(() => DecodeAttention.Splits(0, 1, 1, 132));

    [Fact]
    public void Cpu_operands_are_refused_with_the_reason()
    {
        TorchRuntime.EnsureCpu();
        using var scope = NewDisposeScope();
        var q = zeros(1, 4, 16);
        var k = zeros(1, 2, 16);
        var cache = zeros(1, 2, 8, 16);

        Assert.Equal("not a CUDA tensor", DecodeAttention.Unsupported(q, k));
        var error = Assert.Throws<ArgumentException>(() => DecodeAttention.Run(q, k, k, cache, cache.clone(), 3, zeros(1, 4, 16)));
        Assert.Contains("not a CUDA tensor", error.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void Mismatched_shapes_and_full_caches_are_named()
    {
        TorchRuntime.EnsureCpu();
        using var scope = NewDisposeScope();
        var q = zeros(2, 4, 16);
        var k = zeros(2, 2, 16);

        var shapes = Assert.Throws<ArgumentException>(() => DecodeAttention.Run(q, k, k, zeros(2, 3, 8, 16), zeros(2, 3, 8, 16), 3, zeros(2, 4, 16)));
        Assert.Contains("caches [2, 3, 8, 16]", shapes.Message, StringComparison.Ordinal);
        var full = Assert.Throws<ArgumentException>(() => DecodeAttention.Run(q, k, k, zeros(2, 2, 8, 16), zeros(2, 2, 8, 16), 8, zeros(2, 4, 16)));
        Assert.Contains("hold 8 positions", full.Message, StringComparison.Ordinal);
        var groups = Assert.Throws<ArgumentException>(() => DecodeAttention.Run(zeros(2, 5, 16), k, k, zeros(2, 2, 8, 16), zeros(2, 2, 8, 16), 3, zeros(2, 5, 16)));
        Assert.Contains("multiple of KV heads", groups.Message, StringComparison.Ordinal);
        var caches = (zeros(2, 2, 8, 16), zeros(2, 2, 8, 16));
        var lonely = Assert.Throws<ArgumentException>(() => DecodeAttention.Run(q, k, k, caches.Item1, caches.Item2, 3, zeros(2, 4, 16), cos: zeros(2, 16)));
        Assert.Equal("sin", lonely.ParamName);
        var table = Assert.Throws<ArgumentException>(() => DecodeAttention.Run(q, k, k, caches.Item1, caches.Item2, 3, zeros(2, 4, 16), zeros(1, 16), zeros(1, 16)));
        Assert.Contains("[B, d] = [2, 16]", table.Message, StringComparison.Ordinal);
        var strided = Assert.Throws<ArgumentException>(() => DecodeAttention.Run(q, k, k, caches.Item1, caches.Item2, 3, zeros(2, 4, 16), zeros(16, 2).t(), zeros(16, 2).t()));
        Assert.Contains("contiguous in d", strided.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void Reference_with_rope_tables_equals_attention_over_keys_rotated_as_Hugging_Face_does()
    {
        TorchRuntime.EnsureCpu();
        using var scope = NewDisposeScope();
        manual_seed(11);
        var (b, hkv, group, d, length, capacity) = (2, 2, 2, 8, 4, 7);
        var q = randn(b, hkv * group, d);
        var kNew = randn(b, hkv, d);
        var vNew = randn(b, hkv, d);
        var angles = randn(b, d / 2).repeat(1, 2);   // [B, d]: one angle per pair, both halves
        var (cos, sin) = (angles.cos(), angles.sin());
        var keys = randn(b, hkv, capacity, d);
        var values = randn(b, hkv, capacity, d);
        var (plainKeys, plainValues) = (keys.clone(), values.clone());

        var rotated = DecodeAttention.Reference(q, kNew, vNew, keys, values, length, cos, sin);

        // Hugging Face: x·cos + rotate_half(x)·sin on [B, H, T, hd] with tables [B, 1, T, hd].
        var (cos4, sin4) = (cos.view(b, 1, 1, d), sin.view(b, 1, 1, d));
        var qRotated = RotaryEmbedding.Apply(q.unsqueeze(2), cos4, sin4).squeeze(2);
        var kRotated = RotaryEmbedding.Apply(kNew.unsqueeze(2), cos4, sin4).squeeze(2);
        var expected = DecodeAttention.Reference(qRotated, kRotated, vNew, plainKeys, plainValues, length);
        Assert.True(rotated.allclose(expected, rtol: 1e-5, atol: 1e-5), "attention with the tables differs from attention over rotated q and k");
        Assert.True(keys.allclose(plainKeys, rtol: 1e-6, atol: 1e-6), "the cache did not receive the rotated key");
    }

    [Fact]
    public void Reference_appends_and_matches_softmax_attention_written_out()
    {
        TorchRuntime.EnsureCpu();
        using var scope = NewDisposeScope();
        manual_seed(7);
        var (b, hkv, group, d, length, capacity) = (2, 2, 3, 8, 5, 9);
        var q = randn(b, hkv * group, d);
        var kNew = randn(b, hkv, d);
        var vNew = randn(b, hkv, d);
        var keys = randn(b, hkv, capacity, d);
        var values = randn(b, hkv, capacity, d);
        var before = keys.clone();

        var result = DecodeAttention.Reference(q, kNew, vNew, keys, values, length);

        Assert.True(keys.select(2, length).equal(kNew).all().item<bool>() && values.select(2, length).equal(vNew).all().item<bool>(), "the new key/value were not written at the length");
        Assert.True(keys.narrow(2, 0, length).equal(before.narrow(2, 0, length)).all().item<bool>(), "earlier positions changed");
        for (var row = 0; row < b; row++)
        {
            for (var head = 0; head < hkv * group; head++)
            {
                // Query head h reads KV head h / group; softmax(q·kᵀ/√d)·v over positions 0..length.
                var k = keys[row, head / group].narrow(0, 0, length + 1);
                var v = values[row, head / group].narrow(0, 0, length + 1);
                var weights = (matmul(k, q[row, head]) / Math.Sqrt(d)).softmax(0);
                var expected = matmul(weights, v);
                Assert.True(result[row, head].allclose(expected, rtol: 1e-5, atol: 1e-6), $"row {row}, head {head}");
            }
        }
    }

    [Fact]
    public void Kernel_sources_and_their_shared_header_are_embedded()
    {
        var names = typeof(CudaKernels).Assembly.GetManifestResourceNames();
        foreach (var source in new[] { "decode_attention.cu", "decode_gemv.cu", "rms_norm.cu", "scalar.cuh" })
        {
            Assert.Contains(names, n => n.EndsWith("." + source, StringComparison.Ordinal));
        }
    }

    [Fact]
    public void Kernel_checks_say_they_need_a_GPU()
    {
        TorchRuntime.EnsureCpu();
        var error = Assert.Throws<InvalidOperationException>(() => KernelChecks.DecodeAttentionCases(CPU));
        Assert.Contains("CUDA device", error.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void Plain_kernels_and_the_backend_switch_turn_the_kernel_off()
    {
        Assert.True(LlamaKernelOptions.Default.DecodeAttentionKernel);
        Assert.False(LlamaKernelOptions.Plain.DecodeAttentionKernel);
        Assert.False(LlamaKernelOptions.Plain.DecodeGemvKernel);
        var off = new TorchBackendOptions { DecodeKernels = false }.Kernels;
        Assert.False(off.DecodeAttentionKernel || off.DecodeGemvKernel);
        var onCpu = LlamaKernelOptions.Default.On(CPU);
        Assert.False(onCpu.DecodeAttentionKernel || onCpu.DecodeGemvKernel);   // CUDA-only switches off elsewhere
        Assert.Equal(LlamaKernelOptions.Default with { DecodeAttentionKernel = false, DecodeGemvKernel = false, RmsNormKernel = false }, onCpu);
        Assert.False(LlamaKernelOptions.Default.NormIntoProjections);   // until a GPU run measures it
        Assert.False((LlamaKernelOptions.Default with { NormIntoProjections = true }).On(CPU).NormIntoProjections);
        Assert.True((LlamaKernelOptions.Default with { NormIntoProjections = true }).On(new Device(TorchSharp.DeviceType.CUDA, 0)).NormIntoProjections);
        Assert.False((LlamaKernelOptions.Default with { NormIntoProjections = true, DecodeGemvKernel = false }).On(new Device(TorchSharp.DeviceType.CUDA, 0)).NormIntoProjections);   // it runs in the GEMV
    }

    [Theory]
    [InlineData(ScalarType.BFloat16, 32, 32, 128, null)]
    [InlineData(ScalarType.Float32, 8, 2, 16, null)]
    [InlineData(ScalarType.Float32, 4, 4, 256, "head dimension 256 (1024 bytes per row)")]
    [InlineData(ScalarType.BFloat16, 4, 4, 100, "head dimension 100 (200 bytes per row)")]
    [InlineData(ScalarType.BFloat16, 32, 2, 64, "16 query heads per KV head")]
    [InlineData(ScalarType.Int32, 4, 4, 64, "dtype Int32")]
    public void Model_shapes_the_kernel_cannot_serve_are_named(ScalarType dtype, long heads, long kvHeads, long headDim, string? expected)
    {
        Assert.Equal(expected, DecodeAttention.UnsupportedShape(dtype, heads, kvHeads, headDim));
        // Off CUDA the device is the reason, whatever the shapes.
        Assert.Equal("not a CUDA tensor", DecodeAttention.Unsupported(dtype, TorchSharp.DeviceType.CPU, heads, kvHeads, headDim));
    }

    [Fact]
    public void A_CPU_model_reports_its_decode_attention_path()
    {
        TorchRuntime.EnsureCpu();
        using var model = Dsla.TinyModels.Model(Dsla.TinyModels.Config());
        Assert.Equal("kv copies + sdpa (not a CUDA tensor)", model.DecodeAttentionStatus);
        Assert.False(model.Kernels.DecodeGemvKernel);
        Assert.Equal(DecodeGraphMode.Off, new TorchBackendOptions { CudaGraphs = false }.Kernels.DecodeGraphs);
    }
}

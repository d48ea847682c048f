using DslaMesh.Engine.Backends;
using DslaMesh.Engine.Inference;
using DslaMesh.Engine.Models;
using static TorchSharp.torch;

namespace DslaMesh.Engine.Tests.Models;

/// <summary>The fused fast path (fused Q/K/V and gate/up, fused RMS norm, batched KV) computes what the plain path does.</summary>
public sealed class FastPathTests
{
    [Fact]
    public void Fused_rms_norm_through_the_c_shim_matches_the_composite_form()
    {
        TorchRuntime.EnsureCpu();
        Assert.True(AtenShim.HasFusedRmsNorm(TorchSharp.DeviceType.CPU), "aoti_torch_cpu__fused_rms_norm was not found in libtorch_cpu.so");
        using var scope = NewDisposeScope();
        using var mode = inference_mode();
        var x = randn(3, 5, 64);
        var weight = randn(64);
        Assert.True(AtenShim.TryFusedRmsNorm(x, weight, 1e-5, out var fused));
        var expected = weight * (x * (x.pow(2).mean([-1], keepdim: true) + 1e-5).rsqrt());
        Assert.Equal(x.shape, fused.shape);
        Assert.True((fused - expected).abs().max().item<float>() <= 1e-5);
    }

    [Fact]
    public void Data_pointer_of_a_view_is_offset_from_its_base()
    {
        TorchRuntime.EnsureCpu();
        using var scope = NewDisposeScope();
        var t = zeros(4, 8);
        var row2 = t.narrow(0, 2, 1);
        Assert.Equal(AtenShim.DataPointer(t) + (2 * 8 * sizeof(float)), AtenShim.DataPointer(row2));
    }

    [Theory]
    [InlineData("llama-gqa-untied")]
    [InlineData("llama-tied-llama3-legacy")]
    public void Fused_and_plain_models_give_the_same_logits(string name)
    {
        var device = TorchRuntime.EnsureCpu();
        using var fast = LlamaForCausalLM.Load(Fixtures.Llama(name), ScalarType.Float32, device);
        using var plain = LlamaForCausalLM.Load(Fixtures.Llama(name), ScalarType.Float32, device, kernels: LlamaKernelOptions.Plain);
        using var scope = NewDisposeScope();
        using var mode = inference_mode();
        var ids = tensor(new long[] { 3, 17, 42, 99, 5, 7, 250, 128, 64, 1, 2 }).unsqueeze(0);
        using var fastCache = new SequenceCache(fast.Config.NumHiddenLayers);
        using var plainCache = new SequenceCache(plain.Config.NumHiddenLayers);
        var a = cat([fast.Forward(ids.narrow(1, 0, 8), [fastCache]), fast.Forward(ids.narrow(1, 8, 3), [fastCache])], 1);
        var b = cat([plain.Forward(ids.narrow(1, 0, 8), [plainCache]), plain.Forward(ids.narrow(1, 8, 3), [plainCache])], 1);
        Assert.True((a - b).abs().max().item<float>() <= 1e-5);
    }

    [Fact]
    public void Fused_weights_are_views_so_the_checkpoint_fills_them()
    {
        var device = TorchRuntime.EnsureCpu();
        using var model = LlamaForCausalLM.Load(Fixtures.Llama("llama-gqa-untied"), ScalarType.Float32, device);
        var attention = model.Layers[0].Attention;
        Assert.True(attention.UsesFusedProjections);
        Assert.Equal(model.WeightBytes, model.CheckpointTensors().Values.Sum(t => t.NumberOfElements * t.ElementSize));
    }

    [Fact]
    public void Batched_prefill_and_decode_through_shared_kv_storage_equals_one_sequence_at_a_time()
    {
        var device = TorchRuntime.EnsureCpu();
        using var model = LlamaForCausalLM.Load(Fixtures.Llama("llama-gqa-untied"), ScalarType.Float32, device);
        using var scope = NewDisposeScope();
        using var mode = inference_mode();
        var prompts = tensor(new long[,] { { 5, 6, 7, 8 }, { 40, 41, 42, 43 }, { 9, 99, 199, 3 } });
        var caches = Enumerable.Range(0, 3).Select(_ => new SequenceCache(model.Config.NumHiddenLayers, 8)).ToArray();
        try
        {
            var batched = new List<Tensor> { model.Forward(prompts, caches) };
            Assert.All(caches, c => Assert.IsType<KvState>(c[0]));
            Assert.NotNull(((KvState)caches[0][0]!).Batch);
            var next = tensor(new long[,] { { 11 }, { 12 }, { 13 } });
            for (var step = 0; step < 6; step++)
            {
                batched.Add(model.Forward(next, caches));   // step 5 outgrows capacity 8: rows move to their own storage
            }
            var all = cat(batched, 1);
            for (var row = 0; row < 3; row++)
            {
                using var single = new SequenceCache(model.Config.NumHiddenLayers);
                var pieces = new List<Tensor> { model.Forward(prompts.narrow(0, row, 1), [single]) };
                for (var step = 0; step < 6; step++)
                {
                    pieces.Add(model.Forward(next.narrow(0, row, 1), [single]));
                }
                var expected = cat(pieces, 1);
                Assert.True((all.narrow(0, row, 1) - expected).abs().max().item<float>() <= 1e-5, $"row {row}");
            }
            Assert.All(caches, c => Assert.Equal(10, c.Length));
        }
        finally
        {
            foreach (var cache in caches)
            {
                cache.Dispose();
            }
        }
    }

    [Fact]
    public void Mlp_given_its_norm_applies_it_first_where_the_gemv_cannot_take_it_even_when_input_and_residual_are_one_tensor()
    {
        var device = TorchRuntime.EnsureCpu();
        using var model = LlamaForCausalLM.Load(Fixtures.Llama("llama-gqa-untied"), ScalarType.Float32, device, kernels: LlamaKernelOptions.Default with { NormIntoProjections = true });
        var layer = model.Layers[0];
        Assert.False(layer.PostAttentionNorm.FusesIntoProjections);   // CPU: only CUDA's GEMV kernel fuses it
        using var scope = NewDisposeScope();
        using var mode = inference_mode();
        manual_seed(5);
        var hidden = randn(2, 3, model.Config.HiddenSize);
        var expected = layer.Mlp.AddTo(hidden.clone(), layer.PostAttentionNorm.forward(hidden));

        // As the decode graphs call it: the residual stream is also the norm's input, and the result lands in it.
        var stream = hidden.clone();
        var actual = layer.Mlp.AddTo(stream, stream, layer.PostAttentionNorm);

        Assert.True(ReferenceEquals(stream, actual), "the MLP did not add into the residual in place");
        Assert.True((actual - expected).abs().max().item<float>() <= 1e-6);
    }

    [Theory]
    [InlineData(1)]
    [InlineData(3)]
    public void Segmented_decode_steps_equal_op_by_op_decode(int rows)
    {
        // The CUDA-graph decode path runs exactly these segments; on CPU they run uncaptured.
        var device = TorchRuntime.EnsureCpu();
        using var plain = LlamaForCausalLM.Load(Fixtures.Llama("llama-gqa-untied"), ScalarType.Float32, device, kernels: new LlamaKernelOptions { DecodeGraphs = DecodeGraphMode.Off });
        using var segmented = LlamaForCausalLM.Load(Fixtures.Llama("llama-gqa-untied"), ScalarType.Float32, device, kernels: new LlamaKernelOptions { DecodeGraphs = DecodeGraphMode.Segmented });
        Assert.Equal("off", plain.DecodeGraphStatus);
        Assert.Equal("segmented (no capture)", segmented.DecodeGraphStatus);
        using var scope = NewDisposeScope();
        using var mode = inference_mode();
        var prompts = tensor(new long[,] { { 5, 6, 7, 8, 9 }, { 40, 41, 42, 43, 44 }, { 9, 99, 199, 3, 4 } }).narrow(0, 0, rows);
        var plainCaches = Enumerable.Range(0, rows).Select(_ => new SequenceCache(plain.Config.NumHiddenLayers, 16)).ToArray();
        var segmentedCaches = Enumerable.Range(0, rows).Select(_ => new SequenceCache(segmented.Config.NumHiddenLayers, 16)).ToArray();
        try
        {
            var expected = plain.Forward(prompts, plainCaches, lastPositionOnly: true);
            var actual = segmented.Forward(prompts, segmentedCaches, lastPositionOnly: true);
            for (var step = 0; step < 14; step++)   // past capacity 16: rows move to storage of their own mid-way
            {
                Assert.True((actual - expected).abs().max().item<float>() <= 1e-6, $"step {step}");
                var next = expected.argmax(-1);   // [B, 1]
                expected = plain.Forward(next, plainCaches, lastPositionOnly: true);
                actual = segmented.Forward(next, segmentedCaches, lastPositionOnly: true);
                Assert.Equal(new long[] { rows, 1, plain.Config.VocabSize }, actual.shape);
            }
            Assert.True((actual - expected).abs().max().item<float>() <= 1e-6, "last step");
            Assert.All(segmentedCaches, c => Assert.Equal(5 + 14, c.Length));
        }
        finally
        {
            foreach (var cache in plainCaches.Concat(segmentedCaches))
            {
                cache.Dispose();
            }
        }
    }

    [Fact]
    public void Allocated_batch_caches_decode_from_an_assumed_length()
    {
        var device = TorchRuntime.EnsureCpu();
        using var model = LlamaForCausalLM.Load(Fixtures.Llama("llama-gqa-untied"), ScalarType.Float32, device);
        using var scope = NewDisposeScope();
        using var mode = inference_mode();
        var config = model.Config;
        var caches = SequenceCache.AllocateBatch(2, config.NumHiddenLayers, config.NumKeyValueHeads, config.HeadDim, 32, ScalarType.Float32, device);
        try
        {
            foreach (var cache in caches)
            {
                for (var layer = 0; layer < config.NumHiddenLayers; layer++)
                {
                    var state = (KvState)cache[layer]!;
                    state.Batch!.Keys.normal_();
                    state.Batch.Values.normal_();
                }
                cache.AssumeProcessed(20);
            }
            var logits = model.Forward(tensor(new long[,] { { 1 }, { 2 } }), caches, lastPositionOnly: true);
            Assert.Equal(new long[] { 2, 1, config.VocabSize }, logits.shape);
            Assert.False(logits.isnan().any().item<bool>());
            Assert.All(caches, c => Assert.Equal(21, c.Length));
        }
        finally
        {
            foreach (var cache in caches)
            {
                cache.Dispose();
            }
        }
    }
}

/// <summary>LibTorch switches the engine sets through the C++ ABI.</summary>
public sealed class AtenSwitchTests
{
    [Fact]
    public void Cudnn_attention_switch_round_trips()
    {
        TorchRuntime.EnsureCpu();
        var before = AtenShim.CudnnAttentionEnabled();
        Assert.NotNull(before);
        try
        {
            Assert.False(AtenShim.SetCudnnAttention(false));
            Assert.True(AtenShim.SetCudnnAttention(true));
        }
        finally
        {
            AtenShim.SetCudnnAttention(before!.Value);
        }
    }
}

using DslaMesh.Engine.Backends;
using DslaMesh.Engine.Dsla;
using DslaMesh.Engine.Inference;
using DslaMesh.Engine.Models;
using TorchSharp;
using static DslaMesh.Engine.Tests.Dsla.TinyModels;
using static TorchSharp.torch;

namespace DslaMesh.Engine.Tests.Dsla;

public sealed class DslaLayerTests
{
    public DslaLayerTests() => TorchRuntime.EnsureCpu();

    [Theory]
    [InlineData("dsla", 2, 1)]
    [InlineData("dsla", 2, 2)]
    [InlineData("dsla", 4, 2)]
    [InlineData("dsla-foldable", 2, 1)]
    [InlineData("dsla-foldable", 2, 2)]
    [InlineData("gla", 4, 2)]
    public void Chunked_prefill_then_recurrent_decode_matches_a_cache_free_forward(string variant, int heads, int kvHeads)
    {
        using var scope = NewDisposeScope();
        using var model = Model(Config(heads, kvHeads));
        using var set = DslaLayerSet.Create(model, DslaVariants.Parse(variant), [1], seed: 7);
        set[1].ChunkSize = 8;
        var mix = set.MixAll();
        var ids = Ids(1, 24, seed: 3);
        var full = model.Forward(ids, dslaLayers: mix);            // chunked from zero state over all 24 tokens

        using var cache = new SequenceCache(model.Layers.Count, expectedLength: 32);
        // Prefill 13 tokens (chunks of 8 + 5), continue with a 4-token chunk from a non-zero state, then decode one at a time.
        var prefill = model.Forward(ids.narrow(1, 0, 13), [cache], mix);
        Close(full.narrow(1, 0, 13), prefill, 1e-4, "prefill logits");
        var more = model.Forward(ids.narrow(1, 13, 4), [cache], mix);
        Close(full.narrow(1, 13, 4), more, 1e-4, "second chunk logits");
        for (var t = 17; t < 24; t++)
        {
            var step = model.Forward(ids.narrow(1, t, 1), [cache], mix);
            Close(full.narrow(1, t, 1), step, 1e-4, $"decode logits at position {t}");
        }
        Assert.IsType<KvState>(cache[0]);
        var state = Assert.IsType<DslaState>(cache[1]);
        Assert.Equal(set[1].StateCount, state.Count);
        Assert.All(state.States, s => Assert.Equal(new long[] { 1, kvHeads, 16, 16 }, s.shape));
        Assert.Equal(set[1].StateBytesPerSequence, state.Bytes);
        Assert.Equal(24, cache.Length);
    }

    [Fact]
    public void Batched_decode_of_sequences_at_different_positions_matches_decoding_each_alone()
    {
        using var scope = NewDisposeScope();
        using var model = Model(Config(4, 2));
        using var set = DslaLayerSet.Create(model, DslaVariant.Dsla, [0, 2], seed: 5);
        var mix = set.MixAll();
        var prompts = new[] { Ids(1, 9, seed: 10), Ids(1, 14, seed: 11) };
        var next = Ids(2, 3, seed: 12);

        var alone = new Tensor[2][];
        for (var row = 0; row < 2; row++)
        {
            using var cache = new SequenceCache(model.Layers.Count);
            model.Forward(prompts[row], [cache], mix);
            alone[row] = Enumerable.Range(0, 3).Select(t => model.Forward(next.narrow(0, row, 1).narrow(1, t, 1), [cache], mix)).ToArray();
        }

        using var first = new SequenceCache(model.Layers.Count);
        using var second = new SequenceCache(model.Layers.Count);
        model.Forward(prompts[0], [first], mix);
        model.Forward(prompts[1], [second], mix);
        for (var t = 0; t < 3; t++)
        {
            var batched = model.Forward(next.narrow(1, t, 1), [first, second], mix);   // [2, 1, V], states stacked
            Close(alone[0][t], batched.narrow(0, 0, 1), 1e-5, $"row 0, step {t}");
            Close(alone[1][t], batched.narrow(0, 1, 1), 1e-5, $"row 1, step {t}");
        }
    }

    [Theory]
    [InlineData("dsla")]
    [InlineData("dsla-foldable")]
    [InlineData("gla")]
    public void Switching_a_layer_to_dsla_and_back_restores_the_original_logits_bitwise(string variant)
    {
        using var scope = NewDisposeScope();
        using var model = Model(Config(2, 1));
        var ids = Ids(2, 11, seed: 4);
        var original = model.Forward(ids);
        var originalCached = CachedLogits(model, ids, null);
        using (var set = DslaLayerSet.Create(model, DslaVariants.Parse(variant), [1], seed: 9))
        {
            var converted = model.Forward(ids, dslaLayers: set.MixAll());
            Assert.True(MaxDiff(original, converted) > 1e-3, "DSLA should change the logits of a random model.");
            Assert.True(MaxDiff(originalCached, CachedLogits(model, ids, set.MixAll())) > 1e-3, "DSLA should change the cached logits too.");
            Assert.True(BitwiseEqual(model.Forward(ids, dslaLayers: set.Mix([])), original), "An all-softmax mix with DSLA attached must be bitwise the teacher.");
        }
        Assert.Null(model.Layers[1].Replacement);
        Assert.True(BitwiseEqual(model.Forward(ids), original), "Logits after switching back must be bitwise the original.");
        Assert.True(BitwiseEqual(CachedLogits(model, ids, null), originalCached), "Cached logits after switching back must be bitwise the original.");
    }

    /// <summary>Prefill of all but the last token, then one decode step, with fresh caches: logits [B, 1, V] of the step.</summary>
    private static Tensor CachedLogits(LlamaForCausalLM model, Tensor ids, bool[]? mix)
    {
        var (b, t) = ((int)ids.shape[0], ids.shape[1]);
        var caches = Enumerable.Range(0, b).Select(_ => new SequenceCache(model.Layers.Count)).ToList();
        try
        {
            model.Forward(ids.narrow(1, 0, t - 1), caches, mix);
            return model.Forward(ids.narrow(1, t - 1, 1), caches, mix);
        }
        finally
        {
            caches.ForEach(c => c.Dispose());
        }
    }

    [Theory]
    [InlineData("dsla")]
    [InlineData("dsla-foldable")]
    [InlineData("gla")]
    public void Saved_weights_load_into_a_fresh_model_with_identical_logits(string variant)
    {
        using var scope = NewDisposeScope();
        var path = Path.Combine(Path.GetTempPath(), $"dsla-{variant}-{Guid.NewGuid():N}.safetensors");
        try
        {
            using var model = Model(Config(4, 2));
            var ids = Ids(1, 15, seed: 6);
            Tensor expected;
            using (var set = DslaLayerSet.Create(model, DslaVariants.Parse(variant), [0, 2], seed: 21))
            {
                set[0].ChunkSize = 4;
                expected = model.Forward(ids, dslaLayers: set.MixAll());
                set.Save(path);
            }
            using var fresh = Model(Config(4, 2));
            using var loaded = DslaLayerSet.Load(fresh, path);
            Assert.Equal(DslaVariants.Parse(variant), loaded.Variant);
            Assert.Equal(new[] { 0, 2 }, loaded.Layers);
            loaded[0].ChunkSize = 4;
            Assert.True(BitwiseEqual(fresh.Forward(ids, dslaLayers: loaded.MixAll()), expected), "Reloaded DSLA weights must reproduce the logits bitwise.");

            using var file = Checkpoints.SafeTensorsFile.Open(path);
            Assert.Equal(variant, file.Metadata["variant"]);
            Assert.Contains("model.layers.2.self_attn_dsla.q_proj.weight", file.Entries.Keys);
            Assert.Equal(variant != "dsla-foldable", file.Entries.ContainsKey("model.layers.2.self_attn_dsla.k_proj.weight"));
        }
        finally
        {
            File.Delete(path);
        }
    }

    [Fact]
    public void Loading_reports_the_file_and_tensor_that_is_wrong()
    {
        using var scope = NewDisposeScope();
        var path = Path.Combine(Path.GetTempPath(), $"dsla-bad-{Guid.NewGuid():N}.safetensors");
        try
        {
            using var model = Model(Config(2, 1));
            IReadOnlyDictionary<string, Tensor> tensors;
            using (var set = DslaLayerSet.Create(model, DslaVariant.Dsla, [1], seed: 1))
            {
                tensors = set.CheckpointTensors().ToDictionary(p => p.Key, p => p.Value.clone());
            }
            var metadata = new Dictionary<string, string> { ["variant"] = "dsla" };

            Checkpoints.SafeTensorsFile.Write(path, tensors.Where(p => !p.Key.EndsWith("gk_proj2.bias", StringComparison.Ordinal)), metadata);
            var missing = Assert.Throws<ModelLoadException>(() => DslaLayerSet.Load(model, path));
            Assert.Contains(path, missing.Message, StringComparison.Ordinal);
            Assert.Contains("model.layers.1.self_attn_dsla.gk_proj2.bias", missing.Message, StringComparison.Ordinal);
            Assert.Null(model.Layers[1].Replacement);

            Checkpoints.SafeTensorsFile.Write(path, tensors, new Dictionary<string, string> { ["variant"] = "dsla", ["num_key_value_heads"] = "8" });
            var shape = Assert.Throws<ModelLoadException>(() => DslaLayerSet.Load(model, path));
            Assert.Contains("num_key_value_heads", shape.Message, StringComparison.Ordinal);

            Checkpoints.SafeTensorsFile.Write(path, tensors, new Dictionary<string, string> { ["variant"] = "gla" });
            var wrongVariant = Assert.Throws<ModelLoadException>(() => DslaLayerSet.Load(model, path));
            Assert.Contains("model.layers.1.self_attn_dsla.", wrongVariant.Message, StringComparison.Ordinal);

            Checkpoints.SafeTensorsFile.Write(path, tensors);
            Assert.Contains("variant", Assert.Throws<ModelLoadException>(() => DslaLayerSet.Load(model, path)).Message, StringComparison.Ordinal);
        }
        finally
        {
            File.Delete(path);
        }
    }

    [Fact]
    public void Plain_dsla_cannot_take_over_a_softmax_kv_cache()
    {
        using var scope = NewDisposeScope();
        using var model = Model(Config(2, 1));
        using var set = DslaLayerSet.Create(model, DslaVariant.Dsla, [1], seed: 2);
        using var cache = new SequenceCache(model.Layers.Count);
        model.Forward(Ids(1, 6, seed: 1), [cache]);
        var error = Assert.Throws<InvalidOperationException>(() => model.Forward(Ids(1, 1, seed: 2), [cache], set.MixAll()));
        Assert.Contains("dsla-foldable", error.Message, StringComparison.Ordinal);
        Assert.Throws<InvalidOperationException>(() => set.Fold([cache], 1));
        Assert.IsType<KvState>(cache[1]);
    }

    [Theory]
    [InlineData("dsla")]
    [InlineData("dsla-foldable")]
    [InlineData("gla")]
    public void Gradients_flow_through_the_chunked_training_path(string variant)
    {
        using var scope = NewDisposeScope();
        using var model = Model(Config(4, 2));
        using var set = DslaLayerSet.Create(model, DslaVariants.Parse(variant), [1], seed: 3);
        set.SetTrainable(true);
        set[1].ChunkSize = 5;
        var logits = model.Forward(Ids(2, 17, seed: 8), dslaLayers: set.MixAll());
        logits.pow(2).mean().backward();

        var grads = set[1].named_parameters().ToDictionary(p => p.name, p => p.parameter.grad);
        var expected = variant switch
        {
            "dsla" => new[] { "q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight", "gk_proj.weight", "gk_proj.bias", "gk_proj2.weight", "gk_proj2.bias", "alpha_list" },
            "dsla-foldable" => ["q_proj.weight", "o_proj.weight", "gk_proj.weight", "gk_proj.bias", "gk_proj2.weight", "gk_proj2.bias", "alpha_list"],
            _ => ["q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight", "gk_proj.weight", "gk_proj.bias"],
        };
        Assert.Equal(expected.Order(), grads.Keys.Order());
        foreach (var name in expected)
        {
            var grad = grads[name];
            Assert.True(grad is not null, $"{name} has no gradient.");
            Assert.True(grad.abs().sum().item<float>() > 0, $"{name} has an all-zero gradient.");
        }
        // The teacher stays frozen, including the k/v projections the foldable layer shares.
        Assert.Null(model.Layers[1].Attention.KeyProjection.Weight.grad);
        Assert.Null(model.Layers[0].Attention.QueryProjection.Weight.grad);
    }

    [Fact]
    public void State_stays_fp32_when_the_model_runs_in_bf16()
    {
        using var scope = NewDisposeScope();
        var path = Path.Combine(Path.GetTempPath(), $"dsla-bf16-{Guid.NewGuid():N}.safetensors");
        try
        {
            using var model32 = Model(Config(2, 1));
            using var set32 = DslaLayerSet.Create(model32, DslaVariant.Dsla, [1], seed: 4);
            set32.Save(path);
            // The same weights rounded to bf16 (the DSLA weights through Load, which casts to the model dtype).
            using var model16 = new LlamaForCausalLM(model32.Config, ScalarType.BFloat16, CPU);
            using (no_grad())
            {
                var source = model32.CheckpointTensors();
                foreach (var (name, target) in model16.CheckpointTensors())
                {
                    target.copy_(source[name]);
                }
            }
            using var set16 = DslaLayerSet.Load(model16, path);
            Assert.Equal(ScalarType.BFloat16, ((DslaAttention)set16[1]).QueryProjection.Weight.dtype);

            var ids = Ids(1, 12, seed: 5);
            using var cache32 = new SequenceCache(3);
            using var cache16 = new SequenceCache(3);
            model32.Forward(ids.narrow(1, 0, 9), [cache32], set32.MixAll());
            model16.Forward(ids.narrow(1, 0, 9), [cache16], set16.MixAll());
            Tensor last16 = null!, last32 = null!;
            for (var t = 9; t < 12; t++)
            {
                last32 = model32.Forward(ids.narrow(1, t, 1), [cache32], set32.MixAll());
                last16 = model16.Forward(ids.narrow(1, t, 1), [cache16], set16.MixAll());
            }
            var state = Assert.IsType<DslaState>(cache16[1]);
            Assert.All(state.States, s => Assert.Equal(ScalarType.Float32, s.dtype));
            Assert.Equal(ScalarType.BFloat16, ((KvState)cache16[0]!).View().Keys.dtype);
            Assert.Equal(ScalarType.BFloat16, last16.dtype);
            Assert.True(last16.isfinite().all().item<bool>());
            // The bf16 model tracks the fp32 one to bf16 accuracy.
            var reference = (DslaState)cache32[1]!;
            for (var i = 0; i < 2; i++)
            {
                CloseRelative(reference[i], state[i], 0.05, $"bf16 state {i} vs fp32");
            }
            CloseRelative(last32, last16.to(ScalarType.Float32), 0.05, "bf16 logits vs fp32");
        }
        finally
        {
            File.Delete(path);
        }
    }

    [Theory]
    [InlineData("dsla")]
    [InlineData("dsla-foldable")]
    public void Twenty_decode_steps_leak_no_tensors(string variant)
    {
        using var model = Model(Config(4, 2));
        using var set = DslaLayerSet.Create(model, DslaVariants.Parse(variant), [1, 2], seed: 6);
        var mix = set.MixAll();
        using var cache = new SequenceCache(model.Layers.Count, expectedLength: 64);
        using (NewDisposeScope())
        {
            model.Forward(Ids(1, 7, seed: 1), [cache], mix);
        }
        long token = 3;
        long afterStep2 = 0;
        for (var step = 1; step <= 20; step++)
        {
            using (NewDisposeScope())
            {
                var logits = model.Forward(tensor(new[] { token }).view(1, 1), [cache], mix);
                token = logits.argmax(-1).item<long>();
            }
            if (step == 2)
            {
                afterStep2 = DisposeScopeManager.Statistics.ThreadTotalLiveCount;
            }
        }
        Assert.Equal(afterStep2, DisposeScopeManager.Statistics.ThreadTotalLiveCount);
        Assert.Equal(27, cache.Length);
        // The counter sees this thread's tensors: one deliberately kept tensor moves it by one.
        var kept = zeros(1).DetachFromDisposeScope();
        Assert.Equal(afterStep2 + 1, DisposeScopeManager.Statistics.ThreadTotalLiveCount);
        kept.Dispose();
    }
}

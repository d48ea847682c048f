using DslaMesh.Engine.Backends;
using DslaMesh.Engine.Dsla;
using DslaMesh.Engine.Inference;
using static DslaMesh.Engine.Tests.Dsla.TinyModels;
using static TorchSharp.torch;

namespace DslaMesh.Engine.Tests.Dsla;

public sealed class FoldTests
{
    public FoldTests() => TorchRuntime.EnsureCpu();

    [Theory]
    [InlineData(2, 2)]
    [InlineData(2, 1)]
    [InlineData(4, 2)]
    public void State_folded_from_a_kv_cache_equals_the_state_of_running_the_sequence(int heads, int kvHeads)
    {
        using var scope = NewDisposeScope();
        using var model = Model(Config(heads, kvHeads));
        using var set = DslaLayerSet.Create(model, DslaVariant.DslaFoldable, [1], seed: 11);
        var layer = (FoldableDslaAttention)set[1];
        layer.ChunkSize = 8;
        var ids = Ids(1, 23, seed: 2);

        using var softmax = new SequenceCache(model.Layers.Count);   // layer 1 ran as softmax: holds K (after RoPE) and V
        model.Forward(ids, [softmax]);
        using var dsla = new SequenceCache(model.Layers.Count);      // layer 1 ran as DSLA (layer 0, hence its input, is the same)
        model.Forward(ids, [dsla], set.MixAll());

        using var folded = layer.Fold(Assert.IsType<KvState>(softmax[1]), model.Rotary);
        var expected = Assert.IsType<DslaState>(dsla[1]);
        Assert.Equal(2, folded.Count);
        Close(expected[DslaState.History], folded[DslaState.History], 1e-5, "history state");
        Close(expected[DslaState.Recency], folded[DslaState.Recency], 1e-5, "recency state");
        Assert.True(MaxDiff(folded[0], folded[1]) > 1e-3, "The two gate sets should give different states.");
    }

    [Theory]
    [InlineData(2, 1)]
    [InlineData(4, 2)]
    public void Converting_the_last_layer_mid_sequence_folds_its_cache_and_decodes_as_if_it_had_always_been_dsla(int heads, int kvHeads)
    {
        using var scope = NewDisposeScope();
        using var model = Model(Config(heads, kvHeads));
        using var set = DslaLayerSet.Create(model, DslaVariant.DslaFoldable, [2], seed: 12);
        var mix = set.MixAll();
        var ids = Ids(1, 20, seed: 3);

        using var converted = new SequenceCache(model.Layers.Count);
        model.Forward(ids.narrow(1, 0, 15), [converted]);               // prefill as softmax
        var kvBytes = converted[2]!.Bytes;
        using var always = new SequenceCache(model.Layers.Count);
        model.Forward(ids.narrow(1, 0, 15), [always], mix);            // prefill with layer 2 as DSLA

        for (var t = 15; t < 20; t++)
        {
            // The first DSLA step meets a KvState in layer 2 and folds it in place.
            var expected = model.Forward(ids.narrow(1, t, 1), [always], mix);
            var actual = model.Forward(ids.narrow(1, t, 1), [converted], mix);
            Close(expected, actual, 1e-4, $"logits at position {t}");
        }
        var state = Assert.IsType<DslaState>(converted[2]);
        Assert.Equal(set[2].StateBytesPerSequence, state.Bytes);
        Assert.NotEqual(kvBytes, state.Bytes);
        Assert.IsType<KvState>(converted[1]);
    }

    [Fact]
    public void A_batch_of_sequences_of_different_lengths_folds_in_one_pass()
    {
        using var scope = NewDisposeScope();
        using var model = Model(Config(4, 2));
        using var set = DslaLayerSet.Create(model, DslaVariant.DslaFoldable, [0, 1], seed: 13);
        var layer = (FoldableDslaAttention)set[1];
        int[] lengths = [5, 17, 11];
        var caches = lengths.Select(_ => new SequenceCache(model.Layers.Count)).ToList();
        try
        {
            for (var i = 0; i < lengths.Length; i++)
            {
                model.Forward(Ids(1, lengths[i], seed: 20 + i), [caches[i]]);
            }
            var one = caches.Select(c => layer.Fold((KvState)c[1]!, model.Rotary)).ToList();
            Assert.Equal(3, set.Fold(caches, 1));                      // batched, replaces the entries
            Assert.Equal(0, set.Fold(caches, 1));                      // nothing left to fold
            for (var i = 0; i < lengths.Length; i++)
            {
                var batched = Assert.IsType<DslaState>(caches[i][1]);
                Close(one[i][0], batched[0], 1e-5, $"history state of sequence {i}");
                Close(one[i][1], batched[1], 1e-5, $"recency state of sequence {i}");
                one[i].Dispose();
            }
            Assert.IsType<KvState>(caches[0][0]);

            // Decoding all three together now folds layer 0 on the fly and runs both layers as DSLA.
            var next = Ids(3, 1, seed: 30);
            var logits = model.Forward(next, caches, set.MixAll());
            Assert.True(logits.isfinite().all().item<bool>());
            Assert.All(caches, c => Assert.IsType<DslaState>(c[0]));
        }
        finally
        {
            caches.ForEach(c => c.Dispose());
        }
    }
}

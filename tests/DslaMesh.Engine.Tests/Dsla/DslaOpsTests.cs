using DslaMesh.Engine.Backends;
using DslaMesh.Engine.Dsla;
using static DslaMesh.Engine.Tests.Dsla.TinyModels;
using static TorchSharp.torch;

namespace DslaMesh.Engine.Tests.Dsla;

public sealed class DslaOpsTests
{
    public DslaOpsTests() => TorchRuntime.EnsureCpu();

    [Fact]
    public void Recurrent_matches_a_naive_per_token_loop_with_gqa_and_initial_state()
    {
        using var scope = NewDisposeScope();
        const int b = 2, hq = 4, hkv = 2, t = 7, dk = 5, dv = 3, group = hq / hkv;
        var q = Normal(1, b, hq, t, dk);
        var k = Normal(2, b, hkv, t, dk);
        var v = Normal(3, b, hkv, t, dv);
        var g = LogGates(4, b, hkv, t, dk);
        var s0 = Normal(5, b, hkv, dk, dv);

        var (output, state) = DslaOps.Recurrent(q, k, v, g, s0);

        var (qa, ka, va, ga, sa) = (q.data<float>().ToArray(), k.data<float>().ToArray(), v.data<float>().ToArray(), g.data<float>().ToArray(), s0.data<float>().ToArray());
        var expectedOut = new double[b * hq * t * dv];
        var expectedState = new double[b * hkv * dk * dv];
        var scale = 1.0 / Math.Sqrt(dk);
        for (var bi = 0; bi < b; bi++)
        {
            for (var h = 0; h < hkv; h++)
            {
                var s = new double[dk, dv];
                for (var i = 0; i < dk; i++)
                {
                    for (var j = 0; j < dv; j++)
                    {
                        s[i, j] = sa[(((bi * hkv) + h) * dk + i) * dv + j];
                    }
                }
                for (var ti = 0; ti < t; ti++)
                {
                    for (var i = 0; i < dk; i++)
                    {
                        var decay = Math.Exp(ga[(((bi * hkv) + h) * t + ti) * dk + i]);
                        var key = ka[(((bi * hkv) + h) * t + ti) * dk + i];
                        for (var j = 0; j < dv; j++)
                        {
                            s[i, j] = (s[i, j] * decay) + (key * va[(((bi * hkv) + h) * t + ti) * dv + j]);
                        }
                    }
                    for (var gi = 0; gi < group; gi++)
                    {
                        var head = (h * group) + gi;   // query head → KV head h = head / group
                        for (var j = 0; j < dv; j++)
                        {
                            var sum = 0.0;
                            for (var i = 0; i < dk; i++)
                            {
                                sum += qa[(((bi * hq) + head) * t + ti) * dk + i] * s[i, j];
                            }
                            expectedOut[(((bi * hq) + head) * t + ti) * dv + j] = scale * sum;
                        }
                    }
                }
                for (var i = 0; i < dk; i++)
                {
                    for (var j = 0; j < dv; j++)
                    {
                        expectedState[(((bi * hkv) + h) * dk + i) * dv + j] = s[i, j];
                    }
                }
            }
        }
        Assert.Equal(ScalarType.Float32, output.dtype);
        Assert.Equal(new long[] { b, hq, t, dv }, output.shape);
        Assert.Equal(new long[] { b, hkv, dk, dv }, state.shape);
        Close(tensor(expectedOut).view(b, hq, t, dv), output, 1e-5, "outputs");
        Close(tensor(expectedState).view(b, hkv, dk, dv), state, 1e-5, "final state");
    }

    [Theory]
    [InlineData(4, 2, 37, 5)]
    [InlineData(4, 2, 37, 8)]
    [InlineData(2, 2, 37, 16)]
    [InlineData(3, 1, 37, 64)]
    [InlineData(2, 1, 37, 1)]
    [InlineData(4, 2, 37, 37)]
    [InlineData(2, 2, 1, 4)]
    [InlineData(4, 1, 64, 16)]
    public void Chunked_matches_recurrent_for_any_length_and_chunk_size(int hq, int hkv, int t, int chunk)
    {
        using var scope = NewDisposeScope();
        const int b = 2, dk = 8, dv = 6;
        var q = Normal(11, b, hq, t, dk);
        var k = Normal(12, b, hkv, t, dk);
        var v = Normal(13, b, hkv, t, dv);
        var g = LogGates(14, b, hkv, t, dk);
        var s0 = Normal(15, b, hkv, dk, dv);

        var (expected, expectedState) = DslaOps.Recurrent(q, k, v, g, s0);
        var (actual, actualState) = DslaOps.Chunked(q, k, v, g, s0, chunk);

        Close(expected, actual, 1e-5, $"outputs (Hq {hq}, Hkv {hkv}, T {t}, C {chunk})");
        Close(expectedState, actualState, 1e-5, "final state");
    }

    [Fact]
    public void Chunked_gives_the_same_result_whatever_the_block_split()
    {
        using var scope = NewDisposeScope();
        var (q, k, v, g) = (Normal(21, 1, 4, 45, 8), Normal(22, 1, 2, 45, 8), Normal(23, 1, 2, 45, 8), LogGates(24, 1, 2, 45, 8));
        var (whole, wholeState) = DslaOps.Chunked(q, k, v, g, chunkSize: 8);
        foreach (var block in new[] { 1, 2, 5 })
        {
            var (split, splitState) = DslaOps.Chunked(q, k, v, g, chunkSize: 8, chunksPerBlock: block);
            Close(whole, split, 1e-6, $"outputs, {block} chunks per block");
            Close(wholeState, splitState, 1e-6, $"state, {block} chunks per block");
        }
    }

    [Fact]
    public void Chunked_is_finite_and_exact_for_extreme_gates()
    {
        using var scope = NewDisposeScope();
        const int t = 40;
        var (q, k, v) = (Normal(31, 1, 2, t, 4), Normal(32, 1, 2, t, 4), Normal(33, 1, 2, t, 4));
        // Half the key dims at the −50 clamp (exp(−B) would overflow fp32 after two tokens), half fully open.
        var g = cat([full([1, 2, t, 2], -50f), zeros(1, 2, t, 2)], -1);
        var (expected, expectedState) = DslaOps.Recurrent(q, k, v, g);
        var (actual, actualState) = DslaOps.Chunked(q, k, v, g, chunkSize: 16);
        Assert.True(actual.isfinite().all().item<bool>());
        Close(expected, actual, 1e-5, "outputs");
        Close(expectedState, actualState, 1e-5, "state");
    }

    [Fact]
    public void Several_gate_sets_equal_separate_calls_in_both_forms()
    {
        using var scope = NewDisposeScope();
        var (q, k, v) = (Normal(41, 2, 4, 19, 8), Normal(42, 2, 2, 19, 8), Normal(43, 2, 2, 19, 8));
        var gates = new[] { LogGates(44, 2, 2, 19, 8), LogGates(45, 2, 2, 19, 8) };
        var states = new Tensor?[] { Normal(46, 2, 2, 8, 8), null };
        var (recurrent, recurrentStates) = DslaOps.Recurrent(q, k, v, gates, states);
        var (chunked, chunkedStates) = DslaOps.Chunked(q, k, v, gates, states, chunkSize: 6);
        for (var i = 0; i < 2; i++)
        {
            var (single, singleState) = DslaOps.Chunked(q, k, v, gates[i], states[i], 6);
            Close(single, chunked[i], 1e-6, $"chunked outputs of gate set {i}");
            Close(singleState, chunkedStates[i], 1e-6, $"chunked state of gate set {i}");
            Close(recurrent[i], chunked[i], 1e-5, $"recurrent vs chunked outputs of gate set {i}");
            Close(recurrentStates[i], chunkedStates[i], 1e-5, $"recurrent vs chunked state of gate set {i}");
        }
    }

    [Fact]
    public void Final_states_alone_match_the_recurrence()
    {
        using var scope = NewDisposeScope();
        var (k, v) = (Normal(51, 2, 2, 37, 8), Normal(52, 2, 2, 37, 6));
        var gates = new[] { LogGates(53, 2, 2, 37, 8), LogGates(54, 2, 2, 37, 8) };
        var initial = new Tensor?[] { Normal(55, 2, 2, 8, 6), null };
        var (_, expected) = DslaOps.Recurrent(k, k, v, gates, initial);
        var actual = DslaOps.FinalStates(k, v, gates, initial);
        Close(expected[0], actual[0], 1e-5, "history state");
        Close(expected[1], actual[1], 1e-5, "recency state");
    }

    [Fact]
    public void Chunked_gradients_match_the_recurrent_gradients()
    {
        using var scope = NewDisposeScope();
        Tensor[] Leaves() => [Normal(61, 1, 4, 21, 8), Normal(62, 1, 2, 21, 8), Normal(63, 1, 2, 21, 8), LogGates(64, 1, 2, 21, 8), Normal(65, 1, 2, 8, 8)];
        Tensor[] Gradients(bool chunked)
        {
            var leaves = Leaves().Select(x => x.requires_grad_(true)).ToArray();
            var (o, s) = chunked
                ? DslaOps.Chunked(leaves[0], leaves[1], leaves[2], leaves[3], leaves[4], chunkSize: 5)
                : DslaOps.Recurrent(leaves[0], leaves[1], leaves[2], leaves[3], leaves[4]);
            (o.pow(2).sum() + s.sum()).backward();
            return leaves.Select(l => l.grad!).ToArray();
        }
        var expected = Gradients(chunked: false);
        var actual = Gradients(chunked: true);
        string[] names = ["q", "k", "v", "log-gate", "initial state"];
        for (var i = 0; i < names.Length; i++)
        {
            Assert.NotNull(actual[i]);
            CloseRelative(expected[i], actual[i], 1e-5, $"d/d{names[i]}");
        }
    }

    [Fact]
    public void Half_precision_inputs_give_fp32_outputs_and_states()
    {
        using var scope = NewDisposeScope();
        var (q, k, v, g) = (Normal(71, 1, 2, 9, 8).to(ScalarType.BFloat16), Normal(72, 1, 1, 9, 8).to(ScalarType.BFloat16),
            Normal(73, 1, 1, 9, 8).to(ScalarType.BFloat16), LogGates(74, 1, 1, 9, 8));
        var (o1, s1) = DslaOps.Chunked(q, k, v, g, chunkSize: 4);
        var (o2, s2) = DslaOps.Recurrent(q, k, v, g);
        Assert.All(new[] { o1, s1, o2, s2 }, x => Assert.Equal(ScalarType.Float32, x.dtype));
        Close(o2, o1, 1e-5, "bf16-input outputs");
    }

    [Fact]
    public void Mismatched_shapes_are_rejected_with_a_clear_message()
    {
        using var scope = NewDisposeScope();
        var e = Assert.Throws<ArgumentException>(() => DslaOps.Chunked(Normal(1, 1, 3, 4, 8), Normal(2, 1, 2, 4, 8), Normal(3, 1, 2, 4, 8), LogGates(4, 1, 2, 4, 8)));
        Assert.Contains("multiple of KV heads", e.Message, StringComparison.Ordinal);
    }
}

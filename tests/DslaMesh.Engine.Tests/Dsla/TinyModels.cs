using DslaMesh.Engine.Backends;
using DslaMesh.Engine.Models;
using static TorchSharp.torch;

namespace DslaMesh.Engine.Tests.Dsla;

/// <summary>Tiny random Llama models and tensors for the DSLA tests.</summary>
internal static class TinyModels
{
    public const int Vocab = 64;

    /// <summary>hidden 32, head_dim 16, vocab 64; <paramref name="heads"/> / <paramref name="kvHeads"/> choose MHA or GQA.</summary>
    public static LlamaConfig Config(int heads = 2, int kvHeads = 1, int layers = 3) => new()
    {
        VocabSize = Vocab,
        HiddenSize = 32,
        IntermediateSize = 64,
        NumHiddenLayers = layers,
        NumAttentionHeads = heads,
        NumKeyValueHeads = kvHeads,
        HeadDim = 16,
        MaxPositionEmbeddings = 256,
        Rope = new RopeSettings("default", 10000.0),
    };

    /// <summary>A seeded random model on the CPU (std 0.2 so DSLA and softmax differ visibly).</summary>
    public static LlamaForCausalLM Model(LlamaConfig config, long seed = 1, ScalarType dtype = ScalarType.Float32)
    {
        TorchRuntime.EnsureCpu();
        var model = new LlamaForCausalLM(config, dtype, CPU);
        model.InitializeRandom(seed, std: 0.2);
        return model;
    }

    /// <summary>Seeded token ids [B, T].</summary>
    public static Tensor Ids(int batch, int tokens, long seed)
    {
        using var generator = new Generator((ulong)seed);
        return randint(0, Vocab, [batch, tokens], dtype: ScalarType.Int64, generator: generator);
    }

    /// <summary>Seeded standard-normal fp32 tensor.</summary>
    public static Tensor Normal(long seed, params long[] shape)
    {
        using var generator = new Generator((ulong)seed);
        return randn(shape, dtype: ScalarType.Float32, generator: generator);
    }

    /// <summary>Log-gates as the reference code builds them: clamp_min(logsigmoid(z) / 16, −50), z ~ N(0, 2²).</summary>
    public static Tensor LogGates(long seed, params long[] shape)
    {
        using var scope = NewDisposeScope();
        var z = Normal(seed, shape) * 2;
        return (nn.functional.logsigmoid(z) / 16).clamp_min(-50).MoveToOuterDisposeScope();
    }

    /// <summary>max |a − b| as a double.</summary>
    public static double MaxDiff(Tensor a, Tensor b)
    {
        using var scope = NewDisposeScope();
        Assert.Equal(a.shape, b.shape);
        return (a.to(ScalarType.Float64) - b.to(ScalarType.Float64)).abs().max().item<double>();
    }

    /// <summary>Same shape and every element equal.</summary>
    public static bool BitwiseEqual(Tensor a, Tensor b)
    {
        using var scope = NewDisposeScope();
        return a.shape.SequenceEqual(b.shape) && a.dtype == b.dtype && a.eq(b).all().item<bool>();
    }

    /// <summary>Asserts max |a − b| ≤ tolerance, naming what was compared.</summary>
    public static void Close(Tensor expected, Tensor actual, double tolerance, string what)
    {
        var diff = MaxDiff(expected, actual);
        Assert.True(diff <= tolerance, $"{what}: max |difference| {diff:E3} exceeds {tolerance:E1}.");
    }

    /// <summary>Asserts max |a − b| ≤ tolerance · max(1, max |expected|): a relative bound for large-valued tensors.</summary>
    public static void CloseRelative(Tensor expected, Tensor actual, double tolerance, string what)
    {
        double magnitude;
        using (NewDisposeScope())
        {
            magnitude = Math.Max(1.0, expected.abs().max().to(ScalarType.Float64).item<double>());
        }
        var diff = MaxDiff(expected, actual);
        Assert.True(diff <= tolerance * magnitude, $"{what}: max |difference| {diff:E3} exceeds {tolerance:E1} × {magnitude:G4}.");
    }
}

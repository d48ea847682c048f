using DslaMesh.Engine.Backends;
using DslaMesh.Engine.Inference;
using DslaMesh.Engine.Models;
using TorchSharp;
using static TorchSharp.torch;

namespace DslaMesh.Engine.Tests.Inference;

public sealed class TensorLeakTests
{
    [Theory]
    [InlineData(0.0, DecodeGraphMode.Off)]
    [InlineData(0.8, DecodeGraphMode.Off)]
    [InlineData(0.8, DecodeGraphMode.Segmented)]
    public void Live_tensor_count_stays_flat_across_decode_steps(double temperature, DecodeGraphMode decode)
    {
        var device = TorchRuntime.EnsureCpu();
        using var model = LlamaForCausalLM.Load(Fixtures.Llama("llama-gqa-untied"), ScalarType.Float32, device, kernels: new LlamaKernelOptions { DecodeGraphs = decode });
        var generator = new TextGenerator(model);
        var parameters = new SamplingParameters { Temperature = temperature, TopP = 0.9, TopK = 50, RepetitionPenalty = 1.1, Seed = 7, MaxTokens = 60, IgnoreEos = true, LogProbs = true };
        var counts = new List<long>();
        foreach (var _ in generator.Generate([3, 4, 5, 6], parameters, cancellationToken: TestContext.Current.CancellationToken))
        {
            counts.Add(DisposeScopeManager.Statistics.ThreadTotalLiveCount);
        }
        Assert.Equal(60, counts.Count);
        // From the second token on, every decode step must release everything it allocated
        // (the KV caches grow by reallocation at 64 positions, which swaps tensors one for one).
        Assert.True(counts.Skip(1).Distinct().Count() == 1, $"live tensors per step: {string.Join(",", counts)}");
    }

    [Fact]
    public void Finished_generation_releases_its_cache()
    {
        var device = TorchRuntime.EnsureCpu();
        using var model = LlamaForCausalLM.Load(Fixtures.Llama("llama-gqa-untied"), ScalarType.Float32, device);
        // The first run lets the model build what it caches for good (fused-kernel views, constants); every run after
        // that must leave exactly as many live tensors as it found.
        _ = new TextGenerator(model).Generate([3, 4, 5], SamplingParameters.Greedy(10), cancellationToken: TestContext.Current.CancellationToken).ToList();
        var before = DisposeScopeManager.Statistics.ThreadTotalLiveCount;
        var tokens = new TextGenerator(model).Generate([3, 4, 5], SamplingParameters.Greedy(10), cancellationToken: TestContext.Current.CancellationToken).ToList();
        Assert.NotEmpty(tokens);
        Assert.Equal(before, DisposeScopeManager.Statistics.ThreadTotalLiveCount);
    }
}

using DslaMesh.Engine.Backends;
using DslaMesh.Engine.Inference;
using DslaMesh.Engine.Models;
using static TorchSharp.torch;

namespace DslaMesh.Engine.Tests.Inference;

public sealed class SamplingTests
{
    [Fact]
    public void Same_seed_reproduces_the_stream_and_another_seed_changes_it()
    {
        var device = TorchRuntime.EnsureCpu();
        using var model = LlamaForCausalLM.Load(Fixtures.Llama("llama-gqa-untied"), ScalarType.Float32, device);
        var generator = new TextGenerator(model);
        int[] Run(long seed) => generator.Generate([3, 4, 5], new SamplingParameters { Temperature = 1.5, Seed = seed, MaxTokens = 30, IgnoreEos = true }, cancellationToken: TestContext.Current.CancellationToken).Select(t => t.Id).ToArray();
        Assert.Equal(Run(11), Run(11));
        Assert.NotEqual(Run(11), Run(12));
    }

    [Fact]
    public void Top_k_one_and_tiny_top_p_equal_greedy()
    {
        var device = TorchRuntime.EnsureCpu();
        using var model = LlamaForCausalLM.Load(Fixtures.Llama("llama-gqa-untied"), ScalarType.Float32, device);
        var generator = new TextGenerator(model);
        int[] Run(SamplingParameters p) => generator.Generate([3, 4, 5], p with { MaxTokens = 12, IgnoreEos = true }, cancellationToken: TestContext.Current.CancellationToken).Select(t => t.Id).ToArray();
        var greedy = Run(SamplingParameters.Greedy(12));
        Assert.Equal(greedy, Run(new SamplingParameters { Temperature = 0.7, TopK = 1, Seed = 1 }));
        Assert.Equal(greedy, Run(new SamplingParameters { Temperature = 0.7, TopP = 1e-6, Seed = 1 }));
    }

    [Fact]
    public void Logprobs_are_log_softmax_of_the_model_logits()
    {
        var device = TorchRuntime.EnsureCpu();
        using var model = LlamaForCausalLM.Load(Fixtures.Llama("llama-gqa-untied"), ScalarType.Float32, device);
        var first = new TextGenerator(model).Generate([3, 4, 5], SamplingParameters.Greedy(1) with { LogProbs = true }, cancellationToken: TestContext.Current.CancellationToken).Single();
        using var scope = NewDisposeScope();
        var logits = model.Forward(tensor(new long[] { 3, 4, 5 }).unsqueeze(0))[0, -1];
        Assert.Equal(logits.argmax().item<long>(), first.Id);
        Assert.Equal(logits.log_softmax(0)[first.Id].item<float>(), first.LogProb, 4);
    }

    [Fact]
    public void Repetition_penalty_discourages_seen_tokens()
    {
        var device = TorchRuntime.EnsureCpu();
        using var model = LlamaForCausalLM.Load(Fixtures.Llama("llama-gqa-untied"), ScalarType.Float32, device);
        var generator = new TextGenerator(model);
        var plain = generator.Generate([3, 4, 5], SamplingParameters.Greedy(40) with { IgnoreEos = true }, cancellationToken: TestContext.Current.CancellationToken).Select(t => t.Id).ToList();
        var penalised = generator.Generate([3, 4, 5], SamplingParameters.Greedy(40) with { IgnoreEos = true, RepetitionPenalty = 5.0 }, cancellationToken: TestContext.Current.CancellationToken).Select(t => t.Id).ToList();
        Assert.True(penalised.Distinct().Count() > plain.Distinct().Count(), $"distinct tokens: plain {plain.Distinct().Count()}, penalised {penalised.Distinct().Count()}");
    }

    [Theory]
    [InlineData("temperature", -1.0, 1.0, 0, 1.0, 5)]
    [InlineData("top_p", 1.0, 0.0, 0, 1.0, 5)]
    [InlineData("top_k", 1.0, 1.0, -3, 1.0, 5)]
    [InlineData("repetition_penalty", 1.0, 1.0, 0, 0.0, 5)]
    [InlineData("max_tokens", 1.0, 1.0, 0, 1.0, 0)]
    public void Bad_sampling_values_name_the_field(string field, double temperature, double topP, int topK, double penalty, int maxTokens)
    {
        var parameters = new SamplingParameters { Temperature = temperature, TopP = topP, TopK = topK, RepetitionPenalty = penalty, MaxTokens = maxTokens };
        Assert.Equal(field, Assert.Throws<InvalidSamplingException>(parameters.EnsureValid).Field);
    }

    [Fact]
    public void Prompt_longer_than_the_context_is_rejected_with_both_counts()
    {
        var device = TorchRuntime.EnsureCpu();
        using var model = LlamaForCausalLM.Load(Fixtures.Llama("llama-gqa-untied"), ScalarType.Float32, device);
        var error = Assert.Throws<ContextLengthException>(() => new TextGenerator(model).Generate(Enumerable.Repeat(3, 250).ToArray(), SamplingParameters.Greedy(10), cancellationToken: TestContext.Current.CancellationToken));
        Assert.Equal(260, error.Requested);
        Assert.Equal(256, error.Limit);
    }
}

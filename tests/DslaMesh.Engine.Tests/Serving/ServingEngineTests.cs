using DslaMesh.Engine.Backends;
using DslaMesh.Engine.Inference;
using DslaMesh.Engine.Models;
using DslaMesh.Engine.Serving;
using static TorchSharp.torch;

namespace DslaMesh.Engine.Tests.Serving;

public sealed class ServingEngineTests : IDisposable
{
    private readonly LlamaForCausalLM _model = LlamaForCausalLM.Load(Fixtures.Llama("llama-gqa-untied"), ScalarType.Float32, TorchRuntime.EnsureCpu());

    private ServingEngine CreateEngine(ServingEngineOptions? options = null) =>
        new(_model, null, options ?? new ServingEngineOptions { PrefillChunkTokens = 5 }, Enumerable.Range(0, _model.Config.NumHiddenLayers).ToArray(), "none");

    private static async Task<(List<int> Tokens, CompletionEvent Completion)> Collect(System.Threading.Channels.ChannelReader<GenerationEvent> events)
    {
        var tokens = new List<int>();
        CompletionEvent? completion = null;
        await foreach (var e in events.ReadAllAsync(TestContext.Current.CancellationToken))
        {
            switch (e)
            {
                case TokenEvent t:
                    tokens.Add(t.TokenId);
                    break;
                case CompletionEvent c:
                    completion = c;
                    break;
                case ErrorEvent error:
                    Assert.Fail(error.Message);
                    break;
                default:
                    break;
            }
        }
        return (tokens, completion ?? throw new InvalidOperationException("no completion event"));
    }

    [Fact]
    public async Task Concurrent_requests_produce_the_same_tokens_as_the_engine_alone()
    {
        using var engine = CreateEngine();
        var prompts = Enumerable.Range(0, 6).Select(i => Enumerable.Range(3 + i, 4 + (3 * i)).ToArray()).ToArray();
        SamplingParameters Sampling(int i) => i % 2 == 0
            ? SamplingParameters.Greedy(12 + i) with { IgnoreEos = true }
            : new SamplingParameters { Temperature = 0.9, TopP = 0.95, Seed = 100 + i, MaxTokens = 12 + i, IgnoreEos = true };
        var expected = prompts.Select((p, i) => new TextGenerator(_model).Generate(p, Sampling(i), cancellationToken: TestContext.Current.CancellationToken).Select(t => t.Id).ToList()).ToList();

        var streams = prompts.Select((p, i) => engine.Submit(new GenerationRequest($"r{i}", p, Sampling(i), Fidelity.Balanced, TestContext.Current.CancellationToken))).ToList();
        var results = await Task.WhenAll(streams.Select(Collect));

        for (var i = 0; i < prompts.Length; i++)
        {
            Assert.Equal(expected[i], results[i].Tokens);
            Assert.Equal(FinishReason.Length, results[i].Completion.Reason);
            Assert.Equal(prompts[i].Length, results[i].Completion.Usage.PromptTokens);
            Assert.Equal(12 + i, results[i].Completion.Usage.CompletionTokens);
            Assert.Empty(results[i].Completion.Receipt.DecodeDslaLayers);
        }
        Assert.Equal(0, engine.Snapshot.Running);
    }

    [Fact]
    public async Task Cancellation_frees_the_sequence_at_the_next_token_boundary()
    {
        using var engine = CreateEngine();
        using var cancel = CancellationTokenSource.CreateLinkedTokenSource(TestContext.Current.CancellationToken);
        var events = engine.Submit(new GenerationRequest("c", [3, 4, 5], SamplingParameters.Greedy(200) with { IgnoreEos = true }, Fidelity.Balanced, cancel.Token));
        var seen = 0;
        CompletionEvent? completion = null;
        await foreach (var e in events.ReadAllAsync(TestContext.Current.CancellationToken))
        {
            if (e is TokenEvent && ++seen == 3)
            {
                cancel.Cancel();
            }
            completion = e as CompletionEvent ?? completion;
        }
        Assert.Equal(FinishReason.Cancelled, completion!.Reason);
        Assert.True(completion.Usage.CompletionTokens < 200);
        await WaitUntil(() => engine.Snapshot is { Running: 0, KvBytesUsed: 0 });
    }

    [Fact]
    public void Full_queue_is_rejected_with_retry_after()
    {
        using var engine = CreateEngine(new ServingEngineOptions { MaxBatchSize = 1, MaxQueuedRequests = 1, PrefillChunkTokens = 5 });
        using var cancel = CancellationTokenSource.CreateLinkedTokenSource(TestContext.Current.CancellationToken);
        var long1 = SamplingParameters.Greedy(200) with { IgnoreEos = true };
        engine.Submit(new GenerationRequest("a", [3, 4], long1, Fidelity.Balanced, cancel.Token));
        // "a" must have left the queue for the batch before "b" takes the one queue slot (the engine loop admits it).
        Assert.True(SpinWait.SpinUntil(() => engine.Snapshot.Running == 1, TimeSpan.FromSeconds(10)), "the first request was never admitted");
        engine.Submit(new GenerationRequest("b", [3, 4], long1, Fidelity.Balanced, cancel.Token));
        var error = Assert.Throws<QueueFullException>(() => engine.Submit(new GenerationRequest("c", [3, 4], long1, Fidelity.Balanced, cancel.Token)));
        Assert.True(error.RetryAfter > TimeSpan.Zero);
        cancel.Cancel();
    }

    [Fact]
    public async Task Stale_epochs_and_layers_without_dsla_weights_are_rejected()
    {
        using var engine = CreateEngine();
        var first = await engine.ApplyAsync(5, new Dictionary<int, bool>(), TestContext.Current.CancellationToken);
        Assert.True(first.Accepted);
        var stale = await engine.ApplyAsync(4, new Dictionary<int, bool>(), TestContext.Current.CancellationToken);
        Assert.False(stale.Accepted);
        Assert.Contains("stale epoch", stale.Reason);
        Assert.Equal(5, stale.Epoch);
        var noWeights = await engine.ApplyAsync(6, new Dictionary<int, bool> { [0] = true }, TestContext.Current.CancellationToken);
        Assert.False(noWeights.Accepted);
        Assert.Contains("no DSLA weights", noWeights.Reason);
        var unknown = await engine.ApplyAsync(6, new Dictionary<int, bool> { [9] = true }, TestContext.Current.CancellationToken);
        Assert.Contains("do not exist", unknown.Reason);
    }

    [Fact]
    public void Bad_requests_fail_at_submit_and_do_not_disturb_the_engine()
    {
        using var engine = CreateEngine();
        var ct = TestContext.Current.CancellationToken;
        Assert.Throws<ContextLengthException>(() => engine.Submit(new GenerationRequest("x", Enumerable.Repeat(3, 250).ToArray(), SamplingParameters.Greedy(10), Fidelity.Balanced, ct)));
        Assert.Throws<ArgumentException>(() => engine.Submit(new GenerationRequest("x", [], SamplingParameters.Greedy(10), Fidelity.Balanced, ct)));
        Assert.Throws<ArgumentException>(() => engine.Submit(new GenerationRequest("x", [999], SamplingParameters.Greedy(10), Fidelity.Balanced, ct)));
        Assert.Throws<InvalidSamplingException>(() => engine.Submit(new GenerationRequest("x", [3], new SamplingParameters { TopP = 0 }, Fidelity.Balanced, ct)));
        Assert.Equal(0, engine.Snapshot.Waiting);
    }

    private static async Task WaitUntil(Func<bool> condition)
    {
        var deadline = DateTime.UtcNow.AddSeconds(10);
        while (!condition())
        {
            Assert.True(DateTime.UtcNow < deadline, "condition not reached within 10 s");
            await Task.Delay(10, TestContext.Current.CancellationToken);
        }
    }

    public void Dispose() => _model.Dispose();
}

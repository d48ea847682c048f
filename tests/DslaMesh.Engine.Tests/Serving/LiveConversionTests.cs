using DslaMesh.Engine.Backends;
using DslaMesh.Engine.Dsla;
using DslaMesh.Engine.Inference;
using DslaMesh.Engine.Models;
using DslaMesh.Engine.Serving;
using static TorchSharp.torch;

namespace DslaMesh.Engine.Tests.Serving;

/// <summary>Zero-drop live conversion: a layer flips to DSLA under 8 running streams.</summary>
public sealed class LiveConversionTests : IDisposable
{
    private const int ConvertedLayer = 1;
    private readonly LlamaForCausalLM _model = LlamaForCausalLM.Load(Fixtures.Llama("llama-gqa-untied"), ScalarType.Float32, TorchRuntime.EnsureCpu());
    private readonly DslaLayerSet _dsla;

    public LiveConversionTests() => _dsla = DslaLayerSet.Create(_model, DslaVariant.DslaFoldable, [0, 1], seed: 3);

    [Fact]
    public async Task Conversion_under_eight_streams_loses_none_and_continues_as_the_folded_model()
    {
        using var engine = new ServingEngine(_model, null, new ServingEngineOptions { PrefillChunkTokens = 4 }, [ConvertedLayer, 0], "dsla-foldable");
        var ct = TestContext.Current.CancellationToken;
        var prompts = Enumerable.Range(0, 8).Select(i => Enumerable.Range(10 + (7 * i), 3 + i).ToArray()).ToArray();
        var sampling = SamplingParameters.Greedy(150) with { IgnoreEos = true };
        var streams = prompts.Select((p, i) => engine.Submit(new GenerationRequest($"s{i}", p, sampling, Fidelity.Balanced, ct))).ToList();

        // Read every stream concurrently; convert once each has produced a few tokens.
        var firstTokens = prompts.Select(_ => new TaskCompletionSource()).ToArray();
        var readers = streams.Select((s, i) => ReadAsync(s, firstTokens[i], ct)).ToArray();
        await Task.WhenAll(firstTokens.Select(t => t.Task)).WaitAsync(TimeSpan.FromSeconds(30), ct);
        var result = await engine.ApplyAsync(1, new Dictionary<int, bool> { [ConvertedLayer] = true }, ct);
        Assert.True(result.Accepted, result.Reason);
        Assert.Equal([ConvertedLayer], result.DslaLayers);
        var outputs = await Task.WhenAll(readers);

        var converted = 0;
        for (var i = 0; i < prompts.Length; i++)
        {
            var (tokens, completion) = outputs[i];
            Assert.Equal(FinishReason.Length, completion.Reason);
            Assert.Equal(150, tokens.Count);
            var switches = completion.Receipt.Switches;
            var position = switches.SingleOrDefault(s => s.Layer == ConvertedLayer)?.Position;
            Assert.Equal(Reference(prompts[i], 150, position), tokens);
            if (position is not null)
            {
                converted++;
                Assert.Contains(ConvertedLayer, completion.Receipt.DecodeDslaLayers);
            }
        }
        // Every stream was running when the command arrived, so every one was folded mid-sequence.
        Assert.Equal(prompts.Length, converted);

        // New requests after the conversion run the layer as DSLA from their first token.
        var after = await ReadAsync(engine.Submit(new GenerationRequest("after", prompts[0], sampling, Fidelity.Balanced, ct)), new TaskCompletionSource(), ct);
        Assert.Equal([ConvertedLayer], after.Completion.Receipt.PrefillDslaLayers);
        Assert.Equal(Reference(prompts[0], 150, 0), after.Tokens);
        // Exact fidelity ignores the conversion.
        var exact = await ReadAsync(engine.Submit(new GenerationRequest("exact", prompts[0], sampling, Fidelity.Exact, ct)), new TaskCompletionSource(), ct);
        Assert.Empty(exact.Completion.Receipt.DecodeDslaLayers);
        Assert.Equal(Reference(prompts[0], 150, null), exact.Tokens);
    }

    [Fact]
    public async Task Revert_serves_new_requests_with_attention_while_running_ones_keep_dsla()
    {
        using var engine = new ServingEngine(_model, null, new ServingEngineOptions(), [ConvertedLayer, 0], "dsla-foldable");
        var ct = TestContext.Current.CancellationToken;
        Assert.True((await engine.ApplyAsync(1, new Dictionary<int, bool> { [ConvertedLayer] = true }, ct)).Accepted);
        var sampling = SamplingParameters.Greedy(30) with { IgnoreEos = true };
        var started = new TaskCompletionSource();
        var running = ReadAsync(engine.Submit(new GenerationRequest("r", [5, 6, 7], sampling, Fidelity.Balanced, ct)), started, ct);
        await started.Task.WaitAsync(TimeSpan.FromSeconds(30), ct);
        var revert = await engine.ApplyAsync(2, new Dictionary<int, bool> { [ConvertedLayer] = false }, ct);
        Assert.True(revert.Accepted);
        Assert.Empty(revert.DslaLayers);
        var first = await running;
        Assert.Equal(Reference([5, 6, 7], 30, 0), first.Tokens);
        var second = await ReadAsync(engine.Submit(new GenerationRequest("n", [5, 6, 7], sampling, Fidelity.Balanced, ct)), new TaskCompletionSource(), ct);
        Assert.Equal(Reference([5, 6, 7], 30, null), second.Tokens);
    }

    /// <summary>Greedy tokens with the layer softmax until <paramref name="foldAt"/> positions, then folded and DSLA.</summary>
    private List<int> Reference(int[] prompt, int count, int? foldAt)
    {
        using var scope = NewDisposeScope();
        using var mode = inference_mode();
        using var cache = new SequenceCache(_model.Config.NumHiddenLayers);
        var mix = new bool[_model.Config.NumHiddenLayers];
        if (foldAt == 0)
        {
            mix[ConvertedLayer] = true;
        }
        var tokens = new List<int>();
        var input = prompt.Select(t => (long)t).ToArray();
        while (tokens.Count < count)
        {
            if (foldAt is > 0 && cache.Length == foldAt && !mix[ConvertedLayer])
            {
                _dsla.Fold([cache], ConvertedLayer);
                mix[ConvertedLayer] = true;
            }
            var logits = _model.Forward(tensor(input).unsqueeze(0), [cache], mix, lastPositionOnly: true);
            var next = (int)logits[0, 0].argmax().item<long>();
            tokens.Add(next);
            input = [next];
        }
        return tokens;
    }

    private static async Task<(List<int> Tokens, CompletionEvent Completion)> ReadAsync(System.Threading.Channels.ChannelReader<GenerationEvent> events, TaskCompletionSource afterThree, CancellationToken ct)
    {
        var tokens = new List<int>();
        await foreach (var e in events.ReadAllAsync(ct))
        {
            switch (e)
            {
                case TokenEvent t:
                    tokens.Add(t.TokenId);
                    if (tokens.Count == 3)
                    {
                        afterThree.TrySetResult();
                    }
                    break;
                case CompletionEvent c:
                    return (tokens, c);
                case ErrorEvent error:
                    throw new InvalidOperationException(error.Message);
                default:
                    break;
            }
        }
        throw new InvalidOperationException("stream ended without completion");
    }

    public void Dispose()
    {
        _dsla.Dispose();
        _model.Dispose();
    }
}

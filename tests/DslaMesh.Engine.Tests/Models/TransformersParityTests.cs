using System.Text.Json;
using DslaMesh.Engine.Backends;
using DslaMesh.Engine.Checkpoints;
using DslaMesh.Engine.Inference;
using DslaMesh.Engine.Models;
using static TorchSharp.torch;

namespace DslaMesh.Engine.Tests.Models;

/// <summary>
/// Logits and greedy continuations against Hugging Face transformers' LlamaForCausalLM (fixtures made by
/// tests/fixtures/make_llama_fixtures.py).
/// </summary>
public sealed class TransformersParityTests
{
    public static TheoryData<string> Models => new(Fixtures.LlamaModels);

    [Theory]
    [MemberData(nameof(Models))]
    public void Logits_match_transformers_within_1e_4(string name)
    {
        var device = TorchRuntime.EnsureCpu();
        using var model = LlamaForCausalLM.Load(Fixtures.Llama(name), ScalarType.Float32, device);
        using var reference = SafeTensorsFile.Open(Path.Combine(Fixtures.Llama(name), "reference.safetensors"));
        using var scope = NewDisposeScope();
        using var mode = inference_mode();
        var ids = reference.Read("input_ids");
        var expected = reference.Read("logits");
        var logits = model.Forward(ids.unsqueeze(0))[0];
        Assert.Equal(expected.shape, logits.shape);
        var maxDelta = (logits - expected).abs().max().item<float>();
        Assert.True(maxDelta <= 1e-4, $"{name}: max |Δlogit| = {maxDelta:E3}");
    }

    [Theory]
    [MemberData(nameof(Models))]
    public void Greedy_continuation_matches_transformers(string name)
    {
        var device = TorchRuntime.EnsureCpu();
        using var model = LlamaForCausalLM.Load(Fixtures.Llama(name), ScalarType.Float32, device);
        using var greedy = JsonDocument.Parse(File.ReadAllText(Path.Combine(Fixtures.Llama(name), "greedy.json")));
        var prompt = greedy.RootElement.GetProperty("prompt_ids").EnumerateArray().Select(e => e.GetInt32()).ToArray();
        var expected = greedy.RootElement.GetProperty("continuation").EnumerateArray().Select(e => e.GetInt32()).ToArray();
        var generator = new TextGenerator(model);
        var produced = generator.Generate(prompt, SamplingParameters.Greedy(expected.Length) with { IgnoreEos = true }, cancellationToken: TestContext.Current.CancellationToken).Select(t => t.Id).ToArray();
        Assert.Equal(expected, produced);
    }

    [Theory]
    [MemberData(nameof(Models))]
    public void Decode_with_kv_cache_equals_full_recomputation(string name)
    {
        var device = TorchRuntime.EnsureCpu();
        using var model = LlamaForCausalLM.Load(Fixtures.Llama(name), ScalarType.Float32, device);
        using var reference = SafeTensorsFile.Open(Path.Combine(Fixtures.Llama(name), "reference.safetensors"));
        using var scope = NewDisposeScope();
        using var mode = inference_mode();
        var ids = reference.Read("input_ids").unsqueeze(0);
        var full = model.Forward(ids);
        using var cache = new SequenceCache(model.Config.NumHiddenLayers);
        // Prefill 7 tokens, then a 5-token chunk, then one token at a time.
        var pieces = new List<Tensor> { model.Forward(ids.narrow(1, 0, 7), [cache]), model.Forward(ids.narrow(1, 7, 5), [cache]) };
        for (var i = 12; i < ids.shape[1]; i++)
        {
            pieces.Add(model.Forward(ids.narrow(1, i, 1), [cache]));
        }
        var incremental = cat(pieces, 1);
        Assert.Equal((int)ids.shape[1], cache.Length);
        var maxDelta = (incremental - full).abs().max().item<float>();
        Assert.True(maxDelta <= 1e-4, $"{name}: cached decode differs from recomputation by {maxDelta:E3}");
    }

    [Fact]
    public void Batched_decode_of_sequences_at_different_positions_equals_one_at_a_time()
    {
        var device = TorchRuntime.EnsureCpu();
        using var model = LlamaForCausalLM.Load(Fixtures.Llama("llama-gqa-untied"), ScalarType.Float32, device);
        using var scope = NewDisposeScope();
        using var mode = inference_mode();
        using var a = new SequenceCache(model.Config.NumHiddenLayers);
        using var b = new SequenceCache(model.Config.NumHiddenLayers);
        model.Forward(tensor(new long[] { 5, 6, 7, 8, 9 }).unsqueeze(0), [a]);
        model.Forward(tensor(new long[] { 10, 11 }).unsqueeze(0), [b]);
        using var a2 = new SequenceCache(model.Config.NumHiddenLayers);
        using var b2 = new SequenceCache(model.Config.NumHiddenLayers);
        model.Forward(tensor(new long[] { 5, 6, 7, 8, 9 }).unsqueeze(0), [a2]);
        model.Forward(tensor(new long[] { 10, 11 }).unsqueeze(0), [b2]);

        var batched = model.Forward(tensor(new long[] { 20, 30 }).unsqueeze(1), [a, b]);
        var single = cat([model.Forward(tensor(new long[] { 20 }).unsqueeze(0), [a2]), model.Forward(tensor(new long[] { 30 }).unsqueeze(0), [b2])], 0);
        Assert.True((batched - single).abs().max().item<float>() <= 1e-5);
    }
}

using System.Text.Json;
using DslaMesh.Engine.Backends;
using DslaMesh.Engine.Inference;
using DslaMesh.Engine.Models;
using DslaMesh.Engine.Tokenization;
using static TorchSharp.torch;

namespace DslaMesh.Engine.Tests.Inference;

public sealed class TextStreamingTests
{
    [Fact]
    public void Tokenizer_matches_hugging_face_tokenizers()
    {
        using var tokenizer = TextTokenizer.Load(Fixtures.Llama("llama-gqa-untied"));
        using var reference = JsonDocument.Parse(File.ReadAllText(Path.Combine(Fixtures.Llama("llama-gqa-untied"), "tokenizer_reference.json")));
        foreach (var sample in reference.RootElement.GetProperty("samples").EnumerateArray())
        {
            var ids = sample.GetProperty("ids").EnumerateArray().Select(e => e.GetInt32()).ToArray();
            Assert.Equal(ids, tokenizer.Encode(sample.GetProperty("text").GetString()!));
            Assert.Equal(sample.GetProperty("decoded").GetString(), tokenizer.Decode(ids));
        }
    }

    [Fact]
    public void Streamed_text_concatenates_to_the_full_decode()
    {
        var device = TorchRuntime.EnsureCpu();
        using var model = LlamaForCausalLM.Load(Fixtures.Llama("llama-gqa-untied"), ScalarType.Float32, device);
        using var tokenizer = TextTokenizer.Load(Fixtures.Llama("llama-gqa-untied"));
        var tokens = new TextGenerator(model, tokenizer).Generate(tokenizer.Encode("The quick"), SamplingParameters.Greedy(30) with { IgnoreEos = true }, cancellationToken: TestContext.Current.CancellationToken).ToList();
        Assert.Equal(tokenizer.Decode(tokens.Select(t => t.Id).ToArray()), string.Concat(tokens.Select(t => t.Text)));
        Assert.Equal(FinishReason.Length, tokens[^1].Finish);
    }

    [Fact]
    public void Stop_sequence_ends_the_stream_and_is_not_emitted()
    {
        var device = TorchRuntime.EnsureCpu();
        using var model = LlamaForCausalLM.Load(Fixtures.Llama("llama-gqa-untied"), ScalarType.Float32, device);
        using var tokenizer = TextTokenizer.Load(Fixtures.Llama("llama-gqa-untied"));
        var generator = new TextGenerator(model, tokenizer);
        var free = string.Concat(generator.Generate(tokenizer.Encode("The quick"), SamplingParameters.Greedy(30) with { IgnoreEos = true }, cancellationToken: TestContext.Current.CancellationToken).Select(t => t.Text));
        // Stop on a piece of text the free-running stream produces after its first few characters.
        var stop = free.Substring(5, 2);
        var tokens = generator.Generate(tokenizer.Encode("The quick"), SamplingParameters.Greedy(30) with { IgnoreEos = true, StopSequences = [stop] }, cancellationToken: TestContext.Current.CancellationToken).ToList();
        var text = string.Concat(tokens.Select(t => t.Text));
        Assert.Equal(FinishReason.Stop, tokens[^1].Finish);
        Assert.Equal(free[..free.IndexOf(stop, StringComparison.Ordinal)], text);
    }

    [Theory]
    [InlineData(new[] { "ab", "c", "d" }, "xyz", "abcd", false)]
    [InlineData(new[] { "hello wo", "rld" }, "world", "hello ", true)]
    [InlineData(new[] { "a<", "/s", "> tail" }, "</s>", "a", true)]
    [InlineData(new[] { "x<", "/t" }, "</s>", "x</t", false)]
    public void Stop_matcher_holds_back_possible_prefixes(string[] pieces, string stop, string expectedReleased, bool stopped)
    {
        var matcher = new StopSequenceMatcher([stop]);
        var released = "";
        var hit = false;
        foreach (var piece in pieces)
        {
            var (text, s) = matcher.Push(piece);
            released += text;
            if (s)
            {
                hit = true;
                break;
            }
        }
        if (!hit)
        {
            released += matcher.Flush();
        }
        Assert.Equal(stopped, hit);
        Assert.Equal(expectedReleased, released);
    }
}

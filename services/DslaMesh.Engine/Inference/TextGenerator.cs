using DslaMesh.Engine.Models;
using DslaMesh.Engine.Tokenization;
using static TorchSharp.torch;

namespace DslaMesh.Engine.Inference;

/// <summary>Why a stream ended.</summary>
public enum FinishReason
{
    /// <summary>Reached max tokens.</summary>
    Length,
    /// <summary>Produced a stop token or stop sequence.</summary>
    Stop,
    /// <summary>The caller cancelled.</summary>
    Cancelled,
}

/// <summary>One generated token and the text it released.</summary>
/// <param name="Id">Token id.</param>
/// <param name="Text">New text (may be empty while a multi-byte character or a possible stop sequence is held back).</param>
/// <param name="LogProb">Model log-probability of the token, NaN unless requested.</param>
/// <param name="Finish">Set on the last token of the stream.</param>
public sealed record GeneratedToken(int Id, string Text, float LogProb, FinishReason? Finish);

/// <summary>
/// Single-sequence generation with a KV cache: one prefill pass, then one decode pass per token, each in its own
/// dispose scope under inference mode. The serving engine batches many of these; this is the reference loop the CLI
/// and tests use.
/// </summary>
public sealed class TextGenerator
{
    private readonly LlamaForCausalLM _model;
    private readonly TextTokenizer? _tokenizer;

    public TextGenerator(LlamaForCausalLM model, TextTokenizer? tokenizer = null)
    {
        _model = model;
        _tokenizer = tokenizer;
    }

    /// <summary>Tokens per prefill pass; longer prompts are prefilled in chunks of this size.</summary>
    public int PrefillChunk { get; init; } = 2048;

    /// <summary>Generates from prompt ids; yields tokens as they are chosen.</summary>
    /// <exception cref="ContextLengthException">Prompt plus max tokens exceed the model's context.</exception>
    public IEnumerable<GeneratedToken> Generate(IReadOnlyList<int> promptIds, SamplingParameters parameters, IReadOnlyList<bool>? dslaLayers = null, CancellationToken cancellationToken = default)
    {
        parameters.EnsureValid();
        if (promptIds.Count == 0)
        {
            throw new ArgumentException("The prompt is empty.", nameof(promptIds));
        }
        var needed = promptIds.Count + parameters.MaxTokens;
        if (needed > _model.ContextLength)
        {
            throw new ContextLengthException(needed, _model.ContextLength);
        }
        EnsureInVocabulary(promptIds, _model.Config.VocabSize);
        return Run(promptIds, parameters, dslaLayers, cancellationToken);
    }

    /// <summary>Throws when an id is outside 0..vocab-1, naming it.</summary>
    public static void EnsureInVocabulary(IReadOnlyList<int> ids, int vocab)
    {
        foreach (var id in ids)
        {
            if (id < 0 || id >= vocab)
            {
                throw new ArgumentException($"Token id {id} is outside the vocabulary (0..{vocab - 1}).", nameof(ids));
            }
        }
    }

    private IEnumerable<GeneratedToken> Run(IReadOnlyList<int> promptIds, SamplingParameters parameters, IReadOnlyList<bool>? dslaLayers, CancellationToken cancellationToken)
    {
        using var cache = new SequenceCache(_model.Config.NumHiddenLayers, promptIds.Count + parameters.MaxTokens);
        using var stream = new TokenStream(parameters, promptIds, _model.Config.EosTokenIds, _tokenizer);
        var next = Step(cache, promptIds, stream, dslaLayers, prefill: true);
        while (true)
        {
            if (cancellationToken.IsCancellationRequested)
            {
                yield return new GeneratedToken(next.Token, string.Empty, next.LogProb, FinishReason.Cancelled);
                yield break;
            }
            var token = stream.Accept(next.Token, next.LogProb);
            yield return token;
            if (token.Finish is not null)
            {
                yield break;
            }
            next = Step(cache, [next.Token], stream, dslaLayers, prefill: false);
        }
    }

    private (int Token, float LogProb) Step(SequenceCache cache, IReadOnlyList<int> ids, TokenStream stream, IReadOnlyList<bool>? dslaLayers, bool prefill)
    {
        using var scope = NewDisposeScope();
        using var mode = inference_mode();
        Tensor? logits = null;
        var chunk = prefill ? PrefillChunk : ids.Count;
        for (var start = 0; start < ids.Count; start += chunk)
        {
            var count = Math.Min(chunk, ids.Count - start);
            var input = tensor(ids.Skip(start).Take(count).Select(i => (long)i).ToArray(), device: _model.Device).unsqueeze(0);
            logits = _model.Forward(input, [cache], dslaLayers, lastPositionOnly: true);
        }
        return stream.Sample(logits![0, 0]);
    }
}

/// <summary>
/// Holds back text that could still become a stop sequence and reports when one appears. Stop text itself is
/// never released.
/// </summary>
public sealed class StopSequenceMatcher
{
    private readonly IReadOnlyList<string> _stops;
    private string _pending = string.Empty;

    public StopSequenceMatcher(IReadOnlyList<string> stops) => _stops = stops;

    /// <summary>Adds text; returns what is safe to release and whether a stop sequence was completed.</summary>
    public (string Released, bool Stopped) Push(string text)
    {
        if (_stops.Count == 0)
        {
            return (text, false);
        }
        _pending += text;
        var earliest = _stops.Select(s => _pending.IndexOf(s, StringComparison.Ordinal)).Where(i => i >= 0).DefaultIfEmpty(-1).Min();
        if (earliest >= 0)
        {
            var released = _pending[..earliest];
            _pending = string.Empty;
            return (released, true);
        }
        var hold = _stops.Max(s => LongestSuffixThatPrefixes(_pending, s));
        var safe = _pending[..^hold];
        _pending = _pending[^hold..];
        return (safe, false);
    }

    /// <summary>Releases whatever is held back (the stream ended another way).</summary>
    public string Flush()
    {
        var rest = _pending;
        _pending = string.Empty;
        return rest;
    }

    private static int LongestSuffixThatPrefixes(string text, string stop)
    {
        for (var length = Math.Min(text.Length, stop.Length - 1); length > 0; length--)
        {
            if (text.AsSpan(text.Length - length).SequenceEqual(stop.AsSpan(0, length)))
            {
                return length;
            }
        }
        return 0;
    }
}

using DslaMesh.Engine.Tokenization;
using static TorchSharp.torch;

namespace DslaMesh.Engine.Inference;

/// <summary>
/// The per-sequence side of generation that is not the network: sampling, the token history, incremental
/// detokenisation and the stop rules (max tokens, stop ids, stop sequences). Shared by the reference
/// <see cref="TextGenerator"/> and the batching serving engine so both stop in exactly the same place.
/// </summary>
public sealed class TokenStream : IDisposable
{
    private readonly SamplingParameters _parameters;
    private readonly TokenSampler _sampler;
    private readonly List<int> _history;
    private readonly HashSet<int> _stopIds;
    private readonly IncrementalDecoder? _decoder;
    private readonly StopSequenceMatcher _stops;
    private readonly List<int> _generated = [];

    public TokenStream(SamplingParameters parameters, IReadOnlyList<int> promptIds, IEnumerable<int> eosIds, TextTokenizer? tokenizer)
    {
        _parameters = parameters;
        _sampler = new TokenSampler(parameters);
        _history = new List<int>(promptIds);
        _stopIds = parameters.IgnoreEos ? [.. parameters.StopTokenIds] : [.. parameters.StopTokenIds.Concat(eosIds)];
        _decoder = tokenizer?.CreateDecoder();
        _stops = new StopSequenceMatcher(parameters.StopSequences);
    }

    /// <summary>Tokens accepted so far.</summary>
    public IReadOnlyList<int> Generated => _generated;

    /// <summary>Chooses the next token from logits [V].</summary>
    public (int Token, float LogProb) Sample(Tensor logits) => _sampler.Next(logits, _history);

    /// <summary>Records a chosen token; returns the text it releases and, if the stream ends with it, why.</summary>
    public GeneratedToken Accept(int token, float logProb)
    {
        _history.Add(token);
        _generated.Add(token);
        if (_stopIds.Contains(token))
        {
            return new GeneratedToken(token, _stops.Flush(), logProb, FinishReason.Stop);
        }
        var (released, stopped) = _stops.Push(_decoder?.Push(token) ?? string.Empty);
        if (stopped)
        {
            return new GeneratedToken(token, released, logProb, FinishReason.Stop);
        }
        if (_generated.Count >= _parameters.MaxTokens)
        {
            var (tail, stoppedInTail) = _stops.Push(_decoder?.Flush() ?? string.Empty);
            var rest = stoppedInTail ? string.Empty : _stops.Flush();
            return new GeneratedToken(token, released + tail + rest, logProb, stoppedInTail ? FinishReason.Stop : FinishReason.Length);
        }
        return new GeneratedToken(token, released, logProb, null);
    }

    /// <inheritdoc/>
    public void Dispose() => _sampler.Dispose();
}

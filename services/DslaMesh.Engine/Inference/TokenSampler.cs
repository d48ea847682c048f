using static TorchSharp.torch;

namespace DslaMesh.Engine.Inference;

/// <summary>
/// Chooses tokens for one sequence: repetition penalty, temperature, top-k, top-p, then a draw from the request's own
/// seeded generator (so a seed reproduces a stream whatever else runs in the batch). All on the logits' device.
/// </summary>
public sealed class TokenSampler : IDisposable
{
    private readonly SamplingParameters _parameters;
    private readonly Generator? _generator;

    public TokenSampler(SamplingParameters parameters)
    {
        parameters.EnsureValid();
        _parameters = parameters;
        if (!parameters.IsGreedy)
        {
            var seed = parameters.Seed ?? Random.Shared.NextInt64();
            // The draw happens on the CPU: a per-request CUDA generator is not available through TorchSharp, and a
            // CPU stream makes a seed reproduce the same tokens on every device.
            _generator = new Generator(unchecked((ulong)seed), CPU);
        }
    }

    /// <summary>Picks the next token from logits [V] given the ids the sequence holds so far.</summary>
    public (int Token, float LogProb) Next(Tensor logits, IReadOnlyCollection<int> history)
    {
        using var scope = NewDisposeScope();
        var raw = logits.to(ScalarType.Float32).flatten();
        var adjusted = ApplyRepetitionPenalty(raw, history);
        long token;
        if (_generator is null)
        {
            token = adjusted.argmax().item<long>();
        }
        else
        {
            adjusted = adjusted / _parameters.Temperature;
            if (_parameters.TopK > 0 && _parameters.TopK < adjusted.shape[0])
            {
                var kth = adjusted.topk(_parameters.TopK).values[-1];
                adjusted = adjusted.masked_fill(adjusted < kth, double.NegativeInfinity);
            }
            if (_parameters.TopP < 1.0)
            {
                var (sorted, order) = adjusted.sort(descending: true);
                var probabilities = sorted.softmax(0);
                // Drop a token when the mass before it already reaches top_p; the first token always stays.
                var before = probabilities.cumsum(0) - probabilities;
                var drop = before >= _parameters.TopP;
                var dropInOrder = zeros_like(drop).scatter(0, order, drop);
                adjusted = adjusted.masked_fill(dropInOrder, double.NegativeInfinity);
            }
            token = multinomial(adjusted.softmax(0).cpu(), 1, generator: _generator).item<long>();
        }
        var logProb = _parameters.LogProbs ? raw.log_softmax(0)[token].item<float>() : float.NaN;
        return ((int)token, logProb);
    }

    private Tensor ApplyRepetitionPenalty(Tensor logits, IReadOnlyCollection<int> history)
    {
        if (_parameters.RepetitionPenalty == 1.0 || history.Count == 0)
        {
            return logits;
        }
        var seen = tensor(history.Distinct().Select(i => (long)i).ToArray(), device: logits.device);
        var values = logits.index_select(0, seen);
        var penalised = where(values < 0, values * _parameters.RepetitionPenalty, values / _parameters.RepetitionPenalty);
        return logits.index_copy(0, seen, penalised);
    }

    /// <inheritdoc/>
    public void Dispose() => _generator?.Dispose();
}

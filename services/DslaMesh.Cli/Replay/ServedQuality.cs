using System.Globalization;
using DslaMesh.Engine.Models;
using DslaMesh.Engine.Training;

namespace DslaMesh.Cli.Replay;

/// <summary>
/// Held-out perplexity of what a replay served: each request's output tokens count at the held-out loss of the layer mix
/// that decoded them (its receipt's decode DSLA layers), so a mode's figure is exp(token-weighted mean loss).
/// </summary>
internal sealed class ServedQuality
{
    private readonly LoadedModel _model;
    private readonly int[] _heldOut;
    private readonly int _seqLen;
    private readonly int _maxTokens;
    private readonly Dictionary<string, double> _losses = [];

    public ServedQuality(LoadedModel model, int[] heldOut, int seqLen, int maxTokens)
    {
        _model = model;
        _heldOut = heldOut;
        _seqLen = seqLen;
        _maxTokens = maxTokens;
    }

    /// <summary>Mix key → held-out perplexity, for every mix measured so far.</summary>
    public IReadOnlyDictionary<string, double> Perplexities => _losses.ToDictionary(p => p.Key, p => Math.Exp(p.Value));

    /// <summary>The token-weighted perplexity of the completed requests; null when none produced tokens.</summary>
    public double? Of(IEnumerable<RequestRecord> requests, Action<string> log)
    {
        double weighted = 0;
        long tokens = 0;
        foreach (var request in requests.Where(r => r.Outcome == "ok" && r.OutputTokens > 0))
        {
            weighted += Loss(request.DecodeDslaLayers, log) * request.OutputTokens;
            tokens += request.OutputTokens;
        }
        return tokens == 0 ? null : Math.Exp(weighted / tokens);
    }

    private double Loss(IReadOnlyList<int> layers, Action<string> log)
    {
        var key = string.Join(",", layers.Order());
        if (!_losses.TryGetValue(key, out var loss))
        {
            var mix = new bool[_model.Model.Config.NumHiddenLayers];
            foreach (var layer in layers)
            {
                mix[layer] = true;
            }
            (loss, var count) = TrainingSteps.HeldOutLoss(_model.Model, _heldOut, _seqLen, _maxTokens, batch: 8, layers.Count == 0 ? null : mix);
            _losses[key] = loss;
            log(string.Create(CultureInfo.InvariantCulture, $"held-out perplexity with DSLA layers [{key}]: {Math.Exp(loss):F2} over {count:N0} tokens"));
        }
        return loss;
    }
}

using DslaMesh.Engine.Inference;
using DslaMesh.Engine.Models;
using DslaMesh.Engine.Tokenization;

namespace DslaMesh.Engine.Serving;

/// <summary>A request the engine has admitted: its cache, its token stream and the layer mix it runs with.</summary>
internal sealed class ActiveSequence : IDisposable
{
    private readonly SortedSet<int> _prefillDsla = [];
    private readonly SortedSet<int> _decodeDsla = [];
    private readonly List<LayerSwitch> _switches = [];

    public ActiveSequence(GenerationRequest request, bool[] mix, LlamaForCausalLM model, TextTokenizer? tokenizer)
    {
        Request = request;
        Mix = mix;
        Cache = new SequenceCache(model.Config.NumHiddenLayers, request.PromptIds.Count + request.Sampling.MaxTokens);
        Stream = new TokenStream(request.Sampling, request.PromptIds, model.Config.EosTokenIds, tokenizer);
    }

    public GenerationRequest Request { get; }

    /// <summary>Per layer: runs as DSLA for this sequence. Changes only towards DSLA (folding) while it runs.</summary>
    public bool[] Mix { get; }

    public SequenceCache Cache { get; }

    public TokenStream Stream { get; }

    public int PromptProcessed { get; set; }

    public bool PrefillDone => PromptProcessed >= Request.PromptIds.Count;

    /// <summary>The token to feed at the next decode step; null until the first token or after the last.</summary>
    public int? NextToken { get; set; }

    public bool Finished { get; set; }

    public long StartedTimestamp { get; set; }

    public long FirstTokenTimestamp { get; set; }

    public long LastTokenTimestamp { get; set; }

    /// <summary>Sequences with equal keys can share a forward pass.</summary>
    public string MixKey => string.Create(Mix.Length, Mix, static (span, mix) =>
    {
        for (var i = 0; i < mix.Length; i++)
        {
            span[i] = mix[i] ? '1' : '0';
        }
    });

    /// <summary>Whether this sequence's fidelity lets one more of its layers become DSLA.</summary>
    public bool AcceptsAnotherDslaLayer()
    {
        var fidelity = Request.Fidelity;
        if (fidelity.Mode == FidelityMode.Exact)
        {
            return false;
        }
        if (fidelity.MaxDslaFraction is { } fraction)
        {
            return Mix.Count(m => m) + 1 <= (int)Math.Floor(fraction * Mix.Length);
        }
        return true;
    }

    /// <summary>Marks <paramref name="layer"/> as DSLA from the current position on.</summary>
    public void SwitchToDsla(int layer)
    {
        Mix[layer] = true;
        if (PromptProcessed > 0)
        {
            _switches.Add(new LayerSwitch(layer, Cache.Length));
        }
    }

    public void RecordPrefillMix()
    {
        for (var i = 0; i < Mix.Length; i++)
        {
            if (Mix[i])
            {
                _prefillDsla.Add(i);
            }
        }
    }

    public void RecordDecodeMix()
    {
        for (var i = 0; i < Mix.Length; i++)
        {
            if (Mix[i])
            {
                _decodeDsla.Add(i);
            }
        }
    }

    /// <summary>KV-cache bytes this sequence holds (or will reserve, before its prefill starts).</summary>
    public long KvBytes(long kvBytesPerToken) => PromptProcessed == 0
        ? Mix.Count(m => !m) * kvBytesPerToken * Cache.ExpectedLength
        : Enumerable.Range(0, Cache.LayerCount).Sum(l => Cache[l] is KvState kv ? kv.Bytes : 0);

    /// <summary>What the request's DSLA layers saved: the KV they would hold now minus the states they hold.</summary>
    public ConversionReceipt Receipt(string variant)
    {
        var kvPerTokenPerLayer = 0L;
        var stateBytes = 0L;
        var dslaLayers = 0;
        for (var layer = 0; layer < Cache.LayerCount; layer++)
        {
            switch (Cache[layer])
            {
                case KvState kv:
                    kvPerTokenPerLayer = kv.Capacity == 0 ? kvPerTokenPerLayer : kv.Bytes / kv.Capacity;
                    break;
                case { } state:
                    stateBytes += state.Bytes;
                    dslaLayers++;
                    break;
                default:
                    break;
            }
        }
        var saved = dslaLayers == 0 ? 0 : (dslaLayers * kvPerTokenPerLayer * Cache.Length) - stateBytes;
        return new ConversionReceipt([.. _prefillDsla], [.. _decodeDsla], Mix.Length, saved, variant, _switches);
    }

    public void Dispose()
    {
        Cache.Dispose();
        Stream.Dispose();
    }
}

using System.Threading.Channels;
using DslaMesh.Engine.Inference;

namespace DslaMesh.Engine.Serving;

/// <summary>How much of the model a request lets run as DSLA.</summary>
public enum FidelityMode
{
    /// <summary>Follow the service's current layer mix.</summary>
    Balanced,
    /// <summary>Softmax attention in every layer.</summary>
    Exact,
    /// <summary>Convert up to the service's permitted cap, even beyond its current mix.</summary>
    Fast,
}

/// <summary>A request's fidelity: a mode, optionally capped by a maximum fraction of DSLA layers.</summary>
/// <param name="Mode">The mode.</param>
/// <param name="MaxDslaFraction">0..1; when set, at most this fraction of layers runs as DSLA.</param>
public sealed record Fidelity(FidelityMode Mode, double? MaxDslaFraction = null)
{
    /// <summary>The service's current mix.</summary>
    public static Fidelity Balanced { get; } = new(FidelityMode.Balanced);

    /// <summary>All softmax.</summary>
    public static Fidelity Exact { get; } = new(FidelityMode.Exact);
}

/// <summary>One generation job submitted to the <see cref="ServingEngine"/>.</summary>
public sealed class GenerationRequest
{
    public GenerationRequest(string id, IReadOnlyList<int> promptIds, SamplingParameters sampling, Fidelity fidelity, CancellationToken cancellationToken)
    {
        Id = id;
        PromptIds = promptIds;
        Sampling = sampling;
        Fidelity = fidelity;
        CancellationToken = cancellationToken;
    }

    /// <summary>Request id (for logs and receipts).</summary>
    public string Id { get; }

    /// <summary>Prompt token ids.</summary>
    public IReadOnlyList<int> PromptIds { get; }

    /// <summary>Sampling and stop settings.</summary>
    public SamplingParameters Sampling { get; }

    /// <summary>Requested fidelity.</summary>
    public Fidelity Fidelity { get; }

    /// <summary>Cancelled by the caller (disconnect, deadline); the sequence is freed at the next token boundary.</summary>
    public CancellationToken CancellationToken { get; }

    /// <summary>Where the engine writes this request's events; completes after the final event.</summary>
    internal Channel<GenerationEvent> Events { get; } = Channel.CreateUnbounded<GenerationEvent>(new UnboundedChannelOptions { SingleReader = true, SingleWriter = true });

    /// <summary>When the request was submitted.</summary>
    internal long SubmittedTimestamp { get; set; }
}

/// <summary>Something that happened to a request: tokens were generated, or it finished.</summary>
public abstract record GenerationEvent;

/// <summary>A generated token and the text it released.</summary>
public sealed record TokenEvent(int TokenId, string Text, float LogProb) : GenerationEvent;

/// <summary>The request finished; the last event of every stream.</summary>
public sealed record CompletionEvent(FinishReason Reason, GenerationUsage Usage, GenerationTimings Timings, ConversionReceipt Receipt) : GenerationEvent;

/// <summary>The request failed inside the engine.</summary>
public sealed record ErrorEvent(string Message, bool Retryable) : GenerationEvent;

/// <summary>Token counts.</summary>
public sealed record GenerationUsage(int PromptTokens, int CompletionTokens);

/// <summary>Latencies of one request, in seconds.</summary>
public sealed record GenerationTimings(double QueueSeconds, double TimeToFirstTokenSeconds, double TotalSeconds);

/// <summary>Which layers ran as DSLA for a request and what that saved.</summary>
/// <param name="PrefillDslaLayers">Layers that ran as DSLA during the prompt.</param>
/// <param name="DecodeDslaLayers">Layers that ran as DSLA for at least one generated token.</param>
/// <param name="LayerCount">Layers in the model.</param>
/// <param name="KvBytesSaved">KV-cache bytes the request did not hold at its end because those layers kept DSLA states instead.</param>
/// <param name="Variant">The DSLA variant served.</param>
/// <param name="Switches">Layers converted while the request ran, with the position at which its KV cache was folded.</param>
public sealed record ConversionReceipt(IReadOnlyList<int> PrefillDslaLayers, IReadOnlyList<int> DecodeDslaLayers, int LayerCount, long KvBytesSaved, string Variant, IReadOnlyList<LayerSwitch> Switches);

/// <summary>A layer that became DSLA for a running sequence: its first <see cref="Position"/> tokens were folded.</summary>
public sealed record LayerSwitch(int Layer, int Position);

/// <summary>The admission queue is full; retry after <see cref="RetryAfter"/>.</summary>
public sealed class QueueFullException : Exception
{
    public QueueFullException(int capacity, TimeSpan retryAfter)
        : base($"The admission queue is full ({capacity} waiting); retry after {retryAfter.TotalSeconds:F0} s.")
    {
        RetryAfter = retryAfter;
    }

    public QueueFullException() { }
    public QueueFullException(string message) : base(message) { }
    public QueueFullException(string message, Exception inner) : base(message, inner) { }

    /// <summary>Suggested wait.</summary>
    public TimeSpan RetryAfter { get; }
}

/// <summary>The engine is draining and admits nothing new.</summary>
public sealed class DrainingException : Exception
{
    public DrainingException() : base("The service is draining and accepts no new requests.") { }
    public DrainingException(string message) : base(message) { }
    public DrainingException(string message, Exception inner) : base(message, inner) { }
}

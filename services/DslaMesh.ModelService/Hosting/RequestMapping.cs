using DslaMesh.Engine.Inference;
using DslaMesh.Engine.Models;
using DslaMesh.Engine.Serving;

namespace DslaMesh.ModelService.Hosting;

/// <summary>A request could not be accepted; <see cref="Field"/> names the offending input.</summary>
public sealed class RequestRejectedException : Exception
{
    public RequestRejectedException(string field, string message, RejectionKind kind = RejectionKind.Invalid) : base(message)
    {
        Field = field;
        Kind = kind;
    }

    public RequestRejectedException() { Field = ""; }
    public RequestRejectedException(string message) : base(message) { Field = ""; }
    public RequestRejectedException(string message, Exception inner) : base(message, inner) { Field = ""; }

    public string Field { get; }
    public RejectionKind Kind { get; }
    public TimeSpan? RetryAfter { get; init; }
}

/// <summary>Why a request was rejected, mapped to gRPC status codes and HTTP statuses.</summary>
public enum RejectionKind
{
    Invalid,
    NotFound,
    Overloaded,
    Unavailable,
}

/// <summary>Turns protocol-neutral inputs into an engine request, and engine exceptions into rejections.</summary>
public static class RequestMapping
{
    /// <summary>Validates and submits; every failure comes back as a <see cref="RequestRejectedException"/>.</summary>
    public static System.Threading.Channels.ChannelReader<GenerationEvent> Submit(ModelHost host, string id, string? model, string? prompt, IReadOnlyList<int>? promptIds, SamplingParameters sampling, Fidelity fidelity, CancellationToken cancellationToken)
    {
        var engine = host.Engine ?? throw new RequestRejectedException("", "the model is still loading", RejectionKind.Unavailable);
        if (!string.IsNullOrEmpty(model) && host.Model is { } served && model != served.Name)
        {
            throw new RequestRejectedException("model", $"model '{model}' is not served here; this service serves '{served.Name}'", RejectionKind.NotFound);
        }
        if (fidelity.MaxDslaFraction is { } fraction && (double.IsNaN(fraction) || fraction < 0 || fraction > 1))
        {
            throw new RequestRejectedException("max_dsla_fraction", $"max_dsla_fraction must be between 0 and 1, got {fraction}");
        }
        int[] ids;
        if (promptIds is { Count: > 0 })
        {
            ids = [.. promptIds];
        }
        else if (!string.IsNullOrEmpty(prompt))
        {
            var tokenizer = host.Tokenizer ?? throw new RequestRejectedException("prompt", "this model has no tokenizer; send token ids");
            ids = tokenizer.Encode(prompt);
        }
        else
        {
            throw new RequestRejectedException("prompt", "the prompt is empty");
        }
        try
        {
            return engine.Submit(new GenerationRequest(id, ids, sampling, fidelity, cancellationToken));
        }
        catch (InvalidSamplingException e)
        {
            throw new RequestRejectedException(e.Field, e.Message);
        }
        catch (ContextLengthException e)
        {
            throw new RequestRejectedException("max_tokens",
                $"this model's maximum context length is {e.Limit} tokens; the request asks for {e.Requested} ({ids.Length} in the prompt + {sampling.MaxTokens} max_tokens)");
        }
        catch (QueueFullException e)
        {
            throw new RequestRejectedException("", e.Message, RejectionKind.Overloaded) { RetryAfter = e.RetryAfter };
        }
        catch (DrainingException e)
        {
            throw new RequestRejectedException("", e.Message, RejectionKind.Unavailable);
        }
        catch (ArgumentException e)
        {
            throw new RequestRejectedException("prompt", e.Message);
        }
    }
}

using DslaMesh.Engine.Inference;
using DslaMesh.Engine.Serving;
using DslaMesh.ModelService.Hosting;
using DslaMesh.Protos.V1;
using Grpc.Core;
using EngineFidelity = DslaMesh.Engine.Serving.Fidelity;
using ProtoFidelity = DslaMesh.Protos.V1.Fidelity;

namespace DslaMesh.ModelService.Grpc;

/// <summary>Streaming generation over gRPC. Cancelling the call (or its deadline) frees the sequence.</summary>
public sealed class GenerationGrpcService : Generation.GenerationBase
{
    private readonly ModelHost _host;

    public GenerationGrpcService(ModelHost host) => _host = host;

    /// <inheritdoc/>
    public override async Task Generate(GenerateRequest request, IServerStreamWriter<GenerateResponse> responseStream, ServerCallContext context)
    {
        var sampling = request.Sampling ?? throw GrpcErrors.Invalid("sampling", "sampling (with max_tokens) is required");
        var parameters = new SamplingParameters
        {
            Temperature = sampling.HasTemperature ? sampling.Temperature : 1.0,
            TopP = sampling.HasTopP ? sampling.TopP : 1.0,
            TopK = sampling.HasTopK ? sampling.TopK : 0,
            RepetitionPenalty = sampling.HasRepetitionPenalty ? sampling.RepetitionPenalty : 1.0,
            Seed = sampling.HasSeed ? sampling.Seed : null,
            MaxTokens = sampling.MaxTokens,
            StopSequences = [.. sampling.Stop],
            LogProbs = sampling.Logprobs,
            IgnoreEos = sampling.IgnoreEos,
        };
        var fidelity = new EngineFidelity(request.Fidelity switch
        {
            ProtoFidelity.Exact => FidelityMode.Exact,
            ProtoFidelity.Fast => FidelityMode.Fast,
            _ => FidelityMode.Balanced,
        }, request.HasMaxDslaFraction ? request.MaxDslaFraction : null);

        System.Threading.Channels.ChannelReader<GenerationEvent> events;
        try
        {
            events = RequestMapping.Submit(_host, Guid.NewGuid().ToString("N"), request.Model, request.InputCase == GenerateRequest.InputOneofCase.Prompt ? request.Prompt : null,
                request.InputCase == GenerateRequest.InputOneofCase.TokenIds ? request.TokenIds.Ids : null, parameters, fidelity, context.CancellationToken);
        }
        catch (RequestRejectedException e)
        {
            throw GrpcErrors.From(e, context);
        }

        await foreach (var e in events.ReadAllAsync(CancellationToken.None))
        {
            switch (e)
            {
                case TokenEvent token when !context.CancellationToken.IsCancellationRequested:
                    var message = new GenerateResponse { Text = token.Text };
                    message.TokenIds.Add(token.TokenId);
                    if (parameters.LogProbs)
                    {
                        message.Logprobs.Add(token.LogProb);
                    }
                    await responseStream.WriteAsync(message, context.CancellationToken).ConfigureAwait(false);
                    break;
                case CompletionEvent done when !context.CancellationToken.IsCancellationRequested:
                    await responseStream.WriteAsync(new GenerateResponse { Completion = ToProto(done) }, context.CancellationToken).ConfigureAwait(false);
                    break;
                case ErrorEvent error:
                    throw new RpcException(new Status(error.Retryable ? StatusCode.Unavailable : StatusCode.Internal, error.Message));
                default:
                    break;
            }
        }
    }

    private static Completion ToProto(CompletionEvent done)
    {
        var receipt = new Receipt { LayerCount = done.Receipt.LayerCount, KvBytesSaved = done.Receipt.KvBytesSaved, Variant = done.Receipt.Variant };
        receipt.PrefillDslaLayers.Add(done.Receipt.PrefillDslaLayers);
        receipt.DecodeDslaLayers.Add(done.Receipt.DecodeDslaLayers);
        receipt.Switches.Add(done.Receipt.Switches.Select(s => new Protos.V1.LayerSwitch { Layer = s.Layer, Position = s.Position }));
        return new Completion
        {
            FinishReason = done.Reason.ToString().ToLowerInvariant(),
            Usage = new Usage { PromptTokens = done.Usage.PromptTokens, CompletionTokens = done.Usage.CompletionTokens },
            Timings = new Timings { QueueSeconds = done.Timings.QueueSeconds, TimeToFirstTokenSeconds = done.Timings.TimeToFirstTokenSeconds, TotalSeconds = done.Timings.TotalSeconds },
            Receipt = receipt,
        };
    }
}

/// <summary>gRPC status for rejected requests.</summary>
public static class GrpcErrors
{
    /// <summary>INVALID_ARGUMENT naming a field.</summary>
    public static RpcException Invalid(string field, string message) => new(new Status(StatusCode.InvalidArgument, $"{field}: {message}"));

    /// <summary>The status for a rejection; RESOURCE_EXHAUSTED carries a retry-after trailer.</summary>
    public static RpcException From(RequestRejectedException e, ServerCallContext context)
    {
        var code = e.Kind switch
        {
            RejectionKind.NotFound => StatusCode.NotFound,
            RejectionKind.Overloaded => StatusCode.ResourceExhausted,
            RejectionKind.Unavailable => StatusCode.Unavailable,
            _ => StatusCode.InvalidArgument,
        };
        var trailers = new Metadata();
        if (e.RetryAfter is { } retry)
        {
            trailers.Add("retry-after", ((int)Math.Ceiling(retry.TotalSeconds)).ToString(System.Globalization.CultureInfo.InvariantCulture));
        }
        _ = context;
        return new RpcException(new Status(code, string.IsNullOrEmpty(e.Field) ? e.Message : $"{e.Field}: {e.Message}"), trailers);
    }
}

using System.Buffers.Binary;
using System.Text.Json;
using DslaMesh.Protos.V1;
using ProtoFidelity = DslaMesh.Protos.V1.Fidelity;

namespace DslaMesh.Gateway.Routing;

/// <summary>How much of the model may run as DSLA, as the request asked.</summary>
public enum RequestFidelity
{
    /// <summary>Not said: the replica's current mix (balanced).</summary>
    Unspecified,
    /// <summary>Softmax attention in every layer.</summary>
    Exact,
    /// <summary>Whatever the controller converted.</summary>
    Balanced,
    /// <summary>Up to the policy cap.</summary>
    Fast,
}

/// <summary>
/// What routing needs to know about a request, read from its body before it is forwarded: the model, an estimate of the
/// prompt's length in tokens, and the fidelity. Unknown fields stay at their defaults; the replica validates the request.
/// </summary>
public sealed record RequestTraits(string? Model, int PromptTokens, RequestFidelity Fidelity, double? MaxDslaFraction)
{
    /// <summary>Nothing known.</summary>
    public static RequestTraits Unknown { get; } = new(null, 0, RequestFidelity.Unspecified, null);

    /// <summary>The largest DSLA fraction this request tolerates without cost (exact: 0; others: 1).</summary>
    public double AllowedDslaFraction => MaxDslaFraction ?? (Fidelity == RequestFidelity.Exact ? 0 : 1);

    /// <summary>Reads an OpenAI JSON body (<c>/v1/completions</c>, <c>/v1/chat/completions</c>); top-level fields only.</summary>
    public static RequestTraits FromOpenAiJson(ReadOnlySpan<byte> body, double bytesPerToken)
    {
        string? model = null;
        var fidelity = RequestFidelity.Unspecified;
        double? maxDsla = null;
        long promptBytes = 0;
        var promptTokens = 0;
        try
        {
            var reader = new Utf8JsonReader(body, new JsonReaderOptions { CommentHandling = JsonCommentHandling.Skip });
            if (!reader.Read() || reader.TokenType != JsonTokenType.StartObject)
            {
                return Unknown;
            }
            while (reader.Read() && reader.TokenType == JsonTokenType.PropertyName)
            {
                if (reader.ValueTextEquals("model"u8))
                {
                    reader.Read();
                    model = reader.TokenType == JsonTokenType.String ? reader.GetString() : null;
                }
                else if (reader.ValueTextEquals("fidelity"u8))
                {
                    reader.Read();
                    fidelity = reader.TokenType == JsonTokenType.String ? ParseFidelity(reader.GetString()) : RequestFidelity.Unspecified;
                }
                else if (reader.ValueTextEquals("max_dsla_fraction"u8))
                {
                    reader.Read();
                    maxDsla = reader.TokenType == JsonTokenType.Number && reader.TryGetDouble(out var f) && f is >= 0 and <= 1 ? f : null;
                }
                else if (reader.ValueTextEquals("prompt"u8) || reader.ValueTextEquals("messages"u8))
                {
                    reader.Read();
                    CountPrompt(ref reader, ref promptBytes, ref promptTokens);
                }
                else
                {
                    reader.Read();
                    reader.Skip();
                }
            }
        }
        catch (JsonException)
        {
            // Malformed: the replica answers 400 with the details; route it anywhere.
        }
        return new RequestTraits(model, promptTokens + (int)Math.Min(int.MaxValue, promptBytes / bytesPerToken), fidelity, maxDsla);
    }

    /// <summary>
    /// Reads a gRPC <c>GenerateRequest</c> from its length-prefixed frame. A compressed frame is not inspected.
    /// </summary>
    public static RequestTraits FromGrpcFrame(ReadOnlySpan<byte> body, double bytesPerToken)
    {
        if (body.Length < 5 || body[0] != 0)
        {
            return Unknown;
        }
        var length = BinaryPrimitives.ReadUInt32BigEndian(body[1..5]);
        if (length > body.Length - 5)
        {
            return Unknown;
        }
        GenerateRequest request;
        try
        {
            request = GenerateRequest.Parser.ParseFrom(body.Slice(5, (int)length));
        }
        catch (Google.Protobuf.InvalidProtocolBufferException)
        {
            return Unknown;
        }
        var tokens = request.InputCase == GenerateRequest.InputOneofCase.TokenIds
            ? request.TokenIds.Ids.Count
            : (int)(System.Text.Encoding.UTF8.GetByteCount(request.Prompt) / bytesPerToken);
        var fidelity = request.Fidelity switch
        {
            ProtoFidelity.Exact => RequestFidelity.Exact,
            ProtoFidelity.Balanced => RequestFidelity.Balanced,
            ProtoFidelity.Fast => RequestFidelity.Fast,
            _ => RequestFidelity.Unspecified,
        };
        return new RequestTraits(string.IsNullOrEmpty(request.Model) ? null : request.Model, tokens, fidelity,
            request.HasMaxDslaFraction && request.MaxDslaFraction is >= 0 and <= 1 ? request.MaxDslaFraction : null);
    }

    private static RequestFidelity ParseFidelity(string? value) => value?.ToLowerInvariant() switch
    {
        "exact" => RequestFidelity.Exact,
        "balanced" => RequestFidelity.Balanced,
        "fast" => RequestFidelity.Fast,
        _ => RequestFidelity.Unspecified,
    };

    /// <summary>Counts string bytes (text) and numbers (token ids) in a prompt or messages value, at any depth.</summary>
    private static void CountPrompt(ref Utf8JsonReader reader, ref long bytes, ref int tokens)
    {
        if (reader.TokenType is not (JsonTokenType.StartArray or JsonTokenType.StartObject))
        {
            CountValue(ref reader, ref bytes, ref tokens);
            return;
        }
        var depth = reader.CurrentDepth;
        while (reader.Read() && reader.CurrentDepth > depth)
        {
            CountValue(ref reader, ref bytes, ref tokens);
        }
    }

    private static void CountValue(ref Utf8JsonReader reader, ref long bytes, ref int tokens)
    {
        if (reader.TokenType == JsonTokenType.String)
        {
            bytes += reader.HasValueSequence ? reader.ValueSequence.Length : reader.ValueSpan.Length;
        }
        else if (reader.TokenType == JsonTokenType.Number)
        {
            tokens++;
        }
    }
}

using System.Globalization;
using System.Text.Json;

namespace DslaMesh.Gateway.Proxy;

/// <summary>An error the gateway itself answers, in both protocols' terms.</summary>
/// <param name="HttpStatus">The HTTP status for OpenAI clients.</param>
/// <param name="GrpcStatus">The gRPC status code for gRPC clients (answered trailers-only).</param>
/// <param name="Type">The OpenAI error <c>type</c>.</param>
/// <param name="Code">The OpenAI error <c>code</c>.</param>
public sealed record GatewayError(int HttpStatus, int GrpcStatus, string Type, string Code)
{
    /// <summary>No or wrong API key: 401 / UNAUTHENTICATED.</summary>
    public static GatewayError Unauthenticated { get; } = new(StatusCodes.Status401Unauthorized, 16, "invalid_request_error", "invalid_api_key");

    /// <summary>Per-key rate or concurrency limit: 429 / RESOURCE_EXHAUSTED.</summary>
    public static GatewayError RateLimited { get; } = new(StatusCodes.Status429TooManyRequests, 8, "rate_limit_error", "rate_limit_exceeded");

    /// <summary>Body over the size limit: 413 / RESOURCE_EXHAUSTED.</summary>
    public static GatewayError TooLarge { get; } = new(StatusCodes.Status413PayloadTooLarge, 8, "invalid_request_error", "request_too_large");

    /// <summary>No replica could take the request, or one failed: 503 / UNAVAILABLE (retryable).</summary>
    public static GatewayError Unavailable { get; } = new(StatusCodes.Status503ServiceUnavailable, 14, "service_unavailable", "replica_unavailable");

    /// <summary>A replica failed while answering: 502 / UNAVAILABLE (retryable).</summary>
    public static GatewayError BadGateway { get; } = new(StatusCodes.Status502BadGateway, 14, "service_unavailable", "replica_failed");

    /// <summary>A replica stayed silent past the activity timeout: 504 / DEADLINE_EXCEEDED.</summary>
    public static GatewayError Timeout { get; } = new(StatusCodes.Status504GatewayTimeout, 4, "timeout", "replica_timeout");
}

/// <summary>Writes gateway errors as OpenAI JSON, SSE error events or gRPC statuses.</summary>
public static class GatewayResponses
{
    private static readonly byte[] SseData = "\ndata: "u8.ToArray();
    private static readonly byte[] SseEnd = "\n\ndata: [DONE]\n\n"u8.ToArray();

    /// <summary>Whether the request is gRPC (<c>application/grpc</c>, any subtype).</summary>
    public static bool IsGrpc(HttpRequest request) =>
        request.ContentType is { } type && type.StartsWith("application/grpc", StringComparison.OrdinalIgnoreCase);

    /// <summary>
    /// Answers with an error before anything was sent: gRPC gets a trailers-only response carrying grpc-status and
    /// grpc-message; everyone else an OpenAI error body <c>{"error": {"message", "type", "param", "code"}}</c>.
    /// </summary>
    public static async Task WriteAsync(HttpContext context, GatewayError error, string message, TimeSpan? retryAfter = null)
    {
        ArgumentNullException.ThrowIfNull(context);
        ArgumentNullException.ThrowIfNull(error);
        var response = context.Response;
        response.Clear();
        var retry = retryAfter is { } r ? Math.Max(1, (int)Math.Ceiling(r.TotalSeconds)).ToString(CultureInfo.InvariantCulture) : null;
        if (IsGrpc(context.Request))
        {
            response.StatusCode = StatusCodes.Status200OK;
            response.ContentType = "application/grpc";
            response.Headers["grpc-status"] = error.GrpcStatus.ToString(CultureInfo.InvariantCulture);
            response.Headers["grpc-message"] = Uri.EscapeDataString(message);
            if (retry is not null)
            {
                response.Headers["retry-after"] = retry;
            }
            await response.CompleteAsync().ConfigureAwait(false);
            return;
        }
        response.StatusCode = error.HttpStatus;
        response.ContentType = "application/json";
        if (retry is not null)
        {
            response.Headers.RetryAfter = retry;
        }
        if (error.HttpStatus == StatusCodes.Status401Unauthorized)
        {
            response.Headers.WWWAuthenticate = "Bearer";
        }
        await response.Body.WriteAsync(ErrorJson(error, message), context.RequestAborted).ConfigureAwait(false);
    }

    /// <summary>
    /// Ends a stream that already started: an SSE error event then <c>[DONE]</c> (what the replicas send when they
    /// fail a stream themselves), or gRPC trailers with the status. Returns false for other content, which can only be
    /// cut off.
    /// </summary>
    public static async Task<bool> TryEndStreamAsync(HttpContext context, GatewayError error, string message)
    {
        ArgumentNullException.ThrowIfNull(context);
        ArgumentNullException.ThrowIfNull(error);
        var response = context.Response;
        var type = response.ContentType ?? "";
        if (type.StartsWith("application/grpc", StringComparison.OrdinalIgnoreCase) && response.SupportsTrailers())
        {
            response.AppendTrailer("grpc-status", error.GrpcStatus.ToString(CultureInfo.InvariantCulture));
            response.AppendTrailer("grpc-message", Uri.EscapeDataString(message));
            return true;
        }
        if (type.StartsWith("text/event-stream", StringComparison.OrdinalIgnoreCase))
        {
            // The leading newline ends an event the replica may have left half-written; an empty line is harmless otherwise.
            try
            {
                await response.Body.WriteAsync(SseData, context.RequestAborted).ConfigureAwait(false);
                await response.Body.WriteAsync(ErrorJson(error, message), context.RequestAborted).ConfigureAwait(false);
                await response.Body.WriteAsync(SseEnd, context.RequestAborted).ConfigureAwait(false);
                await response.Body.FlushAsync(context.RequestAborted).ConfigureAwait(false);
            }
            catch (Exception e) when (e is OperationCanceledException or IOException)
            {
                // The client left as well.
            }
            return true;
        }
        return false;
    }

    /// <summary>The OpenAI error body.</summary>
    public static byte[] ErrorJson(GatewayError error, string message)
    {
        ArgumentNullException.ThrowIfNull(error);
        using var buffer = new MemoryStream(128 + message.Length);
        using (var writer = new Utf8JsonWriter(buffer))
        {
            writer.WriteStartObject();
            writer.WriteStartObject("error");
            writer.WriteString("message", message);
            writer.WriteString("type", error.Type);
            writer.WriteNull("param");
            writer.WriteString("code", error.Code);
            writer.WriteEndObject();
            writer.WriteEndObject();
        }
        return buffer.ToArray();
    }
}

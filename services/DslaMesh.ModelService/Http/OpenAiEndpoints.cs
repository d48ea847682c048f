using System.Text;
using System.Text.Json;
using System.Text.Json.Serialization.Metadata;
using DslaMesh.Engine.Inference;
using DslaMesh.Engine.Serving;
using DslaMesh.ModelService.Hosting;
using Microsoft.AspNetCore.Http.Features;

namespace DslaMesh.ModelService.Http;

/// <summary>
/// OpenAI-compatible HTTP: POST /v1/completions and /v1/chat/completions (JSON or SSE with <c>stream: true</c>),
/// GET /v1/models. Every rejection is a 4xx with an OpenAI error body whose <c>param</c> names the field.
/// </summary>
public static class OpenAiEndpoints
{
    private static readonly byte[] DataPrefix = "data: "u8.ToArray();
    private static readonly byte[] EventEnd = "\n\n"u8.ToArray();
    private static readonly byte[] Done = "data: [DONE]\n\n"u8.ToArray();

    /// <summary>Maps the routes.</summary>
    public static IEndpointRouteBuilder MapOpenAi(this IEndpointRouteBuilder app)
    {
        app.MapPost("/v1/completions", CompleteAsync);
        app.MapPost("/v1/chat/completions", ChatAsync);
        app.MapGet("/v1/models", (ModelHost host) => host.Model is { } model && host.Engine is { } engine
            ? Results.Json(new ModelList("list", [new ModelCard(model.Name, "model", 0, "dslamesh", model.ContextLength, model.LayerCount, engine.Snapshot.DslaLayers)]), OpenAiJsonContext.Default.ModelList)
            : Error(StatusCodes.Status503ServiceUnavailable, "the model is still loading", "service_unavailable", null));
        return app;
    }

    private static async Task CompleteAsync(HttpContext http, ModelHost host)
    {
        var body = await ReadAsync(http, OpenAiJsonContext.Default.CompletionRequest).ConfigureAwait(false);
        if (body is null)
        {
            return;
        }
        await Guard(http, async () =>
        {
            var (prompt, ids) = ReadPrompt(body.Prompt);
            var sampling = Sampling(body, body.MaxTokens ?? 16, body.LogProbs is >= 0);
            var events = RequestMapping.Submit(host, NewId("cmpl"), body.Model, prompt, ids, sampling, Fidelity(body), http.RequestAborted);
            var model = host.Model!.Name;
            var id = NewId("cmpl");
            var created = DateTimeOffset.UtcNow.ToUnixTimeSeconds();
            if (body.Stream)
            {
                await StreamAsync(http, events, (text, finish, done) => JsonSerializer.SerializeToUtf8Bytes(
                    new CompletionResponse(id, "text_completion", created, model, [new CompletionChoice(0, text, null, finish)], done is null ? null : Usage(done), done is null ? null : Receipt(done)),
                    OpenAiJsonContext.Default.CompletionResponse)).ConfigureAwait(false);
                return;
            }
            var (textAll, tokens, logprobs, completion) = await CollectAsync(events, host).ConfigureAwait(false);
            await Results.Json(new CompletionResponse(id, "text_completion", created, model,
                [new CompletionChoice(0, textAll, sampling.LogProbs ? new LogProbsDto(tokens, logprobs) : null, FinishName(completion.Reason))],
                Usage(completion), Receipt(completion)), OpenAiJsonContext.Default.CompletionResponse).ExecuteAsync(http).ConfigureAwait(false);
        }).ConfigureAwait(false);
    }

    private static async Task ChatAsync(HttpContext http, ModelHost host)
    {
        var body = await ReadAsync(http, OpenAiJsonContext.Default.ChatCompletionRequest).ConfigureAwait(false);
        if (body is null)
        {
            return;
        }
        await Guard(http, async () =>
        {
            if (body.Messages is not { Count: > 0 })
            {
                throw new RequestRejectedException("messages", "messages must be a non-empty array");
            }
            var prompt = ChatTemplate.Render(body.Messages);
            var sampling = Sampling(body, body.MaxCompletionTokens ?? body.MaxTokens ?? 256, body.LogProbs);
            var events = RequestMapping.Submit(host, NewId("chatcmpl"), body.Model, prompt, null, sampling with { StopSequences = [.. sampling.StopSequences, .. ChatTemplate.StopSequences] }, Fidelity(body), http.RequestAborted);
            var model = host.Model!.Name;
            var id = NewId("chatcmpl");
            var created = DateTimeOffset.UtcNow.ToUnixTimeSeconds();
            if (body.Stream)
            {
                var first = true;
                await StreamAsync(http, events, (text, finish, done) =>
                {
                    var delta = new ChatDelta(first ? "assistant" : null, finish is null ? text : (text.Length > 0 ? text : null));
                    first = false;
                    return JsonSerializer.SerializeToUtf8Bytes(
                        new ChatCompletionResponse(id, "chat.completion.chunk", created, model, [new ChatChoice(0, null, delta, finish)], done is null ? null : Usage(done), done is null ? null : Receipt(done)),
                        OpenAiJsonContext.Default.ChatCompletionResponse);
                }).ConfigureAwait(false);
                return;
            }
            var (textAll, _, _, completion) = await CollectAsync(events, host).ConfigureAwait(false);
            await Results.Json(new ChatCompletionResponse(id, "chat.completion", created, model,
                [new ChatChoice(0, new ChatDelta("assistant", textAll), null, FinishName(completion.Reason))], Usage(completion), Receipt(completion)),
                OpenAiJsonContext.Default.ChatCompletionResponse).ExecuteAsync(http).ConfigureAwait(false);
        }).ConfigureAwait(false);
    }

    private static async Task<T?> ReadAsync<T>(HttpContext http, JsonTypeInfo<T> type) where T : class
    {
        if (http.Request.ContentType is not { } contentType || !contentType.StartsWith("application/json", StringComparison.OrdinalIgnoreCase))
        {
            await Error(StatusCodes.Status415UnsupportedMediaType, "the body must be JSON (Content-Type: application/json)", "invalid_request_error", null).ExecuteAsync(http).ConfigureAwait(false);
            return null;
        }
        try
        {
            var value = await JsonSerializer.DeserializeAsync(http.Request.Body, type, http.RequestAborted).ConfigureAwait(false);
            if (value is null)
            {
                await Error(StatusCodes.Status400BadRequest, "the body must be a JSON object", "invalid_request_error", "body").ExecuteAsync(http).ConfigureAwait(false);
            }
            return value;
        }
        catch (JsonException e)
        {
            var field = e.Path is { Length: > 2 } path ? path.TrimStart('$', '.') : "body";
            var message = e.InnerException is DecoderFallbackException || e.Message.Contains("UTF-8", StringComparison.OrdinalIgnoreCase)
                ? "the body is not valid UTF-8" : $"malformed JSON at '{field}': {e.Message}";
            await Error(StatusCodes.Status400BadRequest, message, "invalid_request_error", field).ExecuteAsync(http).ConfigureAwait(false);
            return null;
        }
        catch (BadHttpRequestException e) when (e.StatusCode == StatusCodes.Status413PayloadTooLarge)
        {
            var limit = http.Features.Get<IHttpMaxRequestBodySizeFeature>()?.MaxRequestBodySize;
            await Error(StatusCodes.Status413PayloadTooLarge, $"the body is larger than {limit} bytes", "invalid_request_error", "body").ExecuteAsync(http).ConfigureAwait(false);
            return null;
        }
    }

    private static async Task Guard(HttpContext http, Func<Task> body)
    {
        try
        {
            await body().ConfigureAwait(false);
        }
        catch (RequestRejectedException e)
        {
            if (http.Response.HasStarted)
            {
                return;
            }
            if (e.RetryAfter is { } retry)
            {
                http.Response.Headers.RetryAfter = ((int)Math.Ceiling(retry.TotalSeconds)).ToString(System.Globalization.CultureInfo.InvariantCulture);
            }
            var (status, type) = e.Kind switch
            {
                RejectionKind.NotFound => (StatusCodes.Status404NotFound, "not_found_error"),
                RejectionKind.Overloaded => (StatusCodes.Status429TooManyRequests, "rate_limit_error"),
                RejectionKind.Unavailable => (StatusCodes.Status503ServiceUnavailable, "service_unavailable"),
                _ => (StatusCodes.Status400BadRequest, "invalid_request_error"),
            };
            await Error(status, e.Message, type, string.IsNullOrEmpty(e.Field) ? null : e.Field).ExecuteAsync(http).ConfigureAwait(false);
        }
    }

    private static SamplingParameters Sampling(OpenAiSamplingRequest body, int maxTokens, bool logprobs)
    {
        if (body.N is { } n && n != 1)
        {
            throw new RequestRejectedException("n", $"only n = 1 is supported, got {n}");
        }
        return new SamplingParameters
        {
            Temperature = body.Temperature ?? 1.0,
            TopP = body.TopP ?? 1.0,
            TopK = body.TopK is null or -1 ? 0 : body.TopK.Value,
            RepetitionPenalty = body.RepetitionPenalty ?? 1.0,
            Seed = body.Seed,
            MaxTokens = maxTokens,
            StopSequences = ReadStop(body.Stop),
            LogProbs = logprobs,
            IgnoreEos = body.IgnoreEos,
        };
    }

    private static Fidelity Fidelity(OpenAiSamplingRequest body) => new(body.Fidelity?.ToLowerInvariant() switch
    {
        null or "" or "balanced" => FidelityMode.Balanced,
        "exact" => FidelityMode.Exact,
        "fast" => FidelityMode.Fast,
        var other => throw new RequestRejectedException("fidelity", $"fidelity must be exact, balanced or fast, got '{other}'"),
    }, body.MaxDslaFraction);

    private static string[] ReadStop(JsonElement? stop) => stop switch
    {
        null or { ValueKind: JsonValueKind.Null } => [],
        { ValueKind: JsonValueKind.String } s => [Text(s, "stop")],
        { ValueKind: JsonValueKind.Array } a when a.EnumerateArray().All(e => e.ValueKind == JsonValueKind.String) => a.EnumerateArray().Select(e => Text(e, "stop")).ToArray(),
        _ => throw new RequestRejectedException("stop", "stop must be a string or an array of strings"),
    };

    private static (string? Text, int[]? Ids) ReadPrompt(JsonElement? prompt) => prompt switch
    {
        { ValueKind: JsonValueKind.String } s => (Text(s, "prompt"), null),
        { ValueKind: JsonValueKind.Array } a when a.GetArrayLength() == 1 && a[0].ValueKind == JsonValueKind.String => (Text(a[0], "prompt"), null),
        { ValueKind: JsonValueKind.Array } a when a.GetArrayLength() > 0 && a.EnumerateArray().All(e => e.ValueKind == JsonValueKind.Number && e.TryGetInt32(out _)) => (null, a.EnumerateArray().Select(e => e.GetInt32()).ToArray()),
        null or { ValueKind: JsonValueKind.Null } => throw new RequestRejectedException("prompt", "prompt is required"),
        _ => throw new RequestRejectedException("prompt", "prompt must be a string or an array of token ids (one prompt per request)"),
    };

    /// <summary>A JSON string's value; invalid UTF-8 inside it is reported against the field.</summary>
    private static string Text(JsonElement element, string field)
    {
        try
        {
            return element.GetString()!;
        }
        catch (InvalidOperationException e)
        {
            throw new RequestRejectedException(field, $"{field} is not valid UTF-8: {e.Message}");
        }
    }

    private static async Task StreamAsync(HttpContext http, System.Threading.Channels.ChannelReader<GenerationEvent> events, Func<string, string?, CompletionEvent?, byte[]> chunk)
    {
        http.Response.ContentType = "text/event-stream";
        http.Response.Headers.CacheControl = "no-cache";
        http.Response.Headers["X-Accel-Buffering"] = "no";
        var body = http.Response.Body;
        await http.Response.StartAsync(http.RequestAborted).ConfigureAwait(false);
        try
        {
            await foreach (var e in events.ReadAllAsync(CancellationToken.None))
            {
                byte[]? payload = e switch
                {
                    TokenEvent token => token.Text.Length == 0 ? null : chunk(token.Text, null, null),
                    CompletionEvent done => chunk(string.Empty, FinishName(done.Reason), done),
                    ErrorEvent error => JsonSerializer.SerializeToUtf8Bytes(new ErrorBody(new ErrorDetail(error.Message, error.Retryable ? "service_unavailable" : "server_error", null, null)), OpenAiJsonContext.Default.ErrorBody),
                    _ => null,
                };
                if (payload is null || http.RequestAborted.IsCancellationRequested)
                {
                    continue;
                }
                await body.WriteAsync(DataPrefix, http.RequestAborted).ConfigureAwait(false);
                await body.WriteAsync(payload, http.RequestAborted).ConfigureAwait(false);
                await body.WriteAsync(EventEnd, http.RequestAborted).ConfigureAwait(false);
                await body.FlushAsync(http.RequestAborted).ConfigureAwait(false);
            }
            await body.WriteAsync(Done, http.RequestAborted).ConfigureAwait(false);
            await body.FlushAsync(http.RequestAborted).ConfigureAwait(false);
        }
        catch (OperationCanceledException) when (http.RequestAborted.IsCancellationRequested)
        {
            // The client went away; the engine frees the sequence at its next token boundary.
        }
    }

    private static async Task<(string Text, List<string> Tokens, List<float> LogProbs, CompletionEvent Completion)> CollectAsync(System.Threading.Channels.ChannelReader<GenerationEvent> events, ModelHost host)
    {
        var text = new StringBuilder();
        var tokens = new List<string>();
        var logprobs = new List<float>();
        await foreach (var e in events.ReadAllAsync(CancellationToken.None))
        {
            switch (e)
            {
                case TokenEvent token:
                    text.Append(token.Text);
                    tokens.Add(host.Tokenizer?.Decode([token.TokenId]) ?? token.TokenId.ToString(System.Globalization.CultureInfo.InvariantCulture));
                    logprobs.Add(token.LogProb);
                    break;
                case CompletionEvent completion:
                    return (text.ToString(), tokens, logprobs, completion);
                case ErrorEvent error:
                    throw new RequestRejectedException("", error.Message, RejectionKind.Unavailable);
                default:
                    break;
            }
        }
        throw new RequestRejectedException("", "the stream ended without a completion", RejectionKind.Unavailable);
    }

    private static UsageDto Usage(CompletionEvent done) => new(done.Usage.PromptTokens, done.Usage.CompletionTokens, done.Usage.PromptTokens + done.Usage.CompletionTokens);

    private static ReceiptDto Receipt(CompletionEvent done) => new(done.Receipt.PrefillDslaLayers, done.Receipt.DecodeDslaLayers, done.Receipt.LayerCount,
        done.Receipt.KvBytesSaved, done.Receipt.Variant, done.Timings.TimeToFirstTokenSeconds, done.Timings.QueueSeconds);

    private static string FinishName(FinishReason reason) => reason switch
    {
        FinishReason.Length => "length",
        FinishReason.Stop => "stop",
        _ => "cancelled",
    };

    private static string NewId(string prefix) => $"{prefix}-{Guid.NewGuid():N}";

    /// <summary>An OpenAI-style error result.</summary>
    public static IResult Error(int status, string message, string type, string? param) =>
        Results.Json(new ErrorBody(new ErrorDetail(message, type, param, null)), OpenAiJsonContext.Default.ErrorBody, statusCode: status);
}

/// <summary>
/// The chat template for models without one of their own: <c>role: content</c> lines, then <c>assistant:</c>.
/// Generation stops before the model starts a new turn.
/// </summary>
public static class ChatTemplate
{
    /// <summary>Stops that end the assistant's turn.</summary>
    public static readonly string[] StopSequences = ["\nuser:", "\nsystem:"];

    /// <summary>Renders messages into a prompt; a message without role or content is rejected.</summary>
    public static string Render(IReadOnlyList<ChatMessage> messages)
    {
        var builder = new StringBuilder();
        for (var i = 0; i < messages.Count; i++)
        {
            var role = messages[i].Role?.ToLowerInvariant();
            if (role is not ("system" or "user" or "assistant"))
            {
                throw new RequestRejectedException($"messages[{i}].role", "role must be system, user or assistant");
            }
            if (messages[i].Content is null)
            {
                throw new RequestRejectedException($"messages[{i}].content", "content must be a string");
            }
            builder.Append(role).Append(": ").Append(messages[i].Content).Append('\n');
        }
        return builder.Append("assistant:").ToString();
    }
}

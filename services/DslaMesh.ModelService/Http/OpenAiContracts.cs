using System.Text.Json;
using System.Text.Json.Serialization;

namespace DslaMesh.ModelService.Http;

/// <summary>Sampling fields shared by /v1/completions and /v1/chat/completions (OpenAI names, plus DslaMesh's).</summary>
public abstract class OpenAiSamplingRequest
{
    [JsonPropertyName("model")] public string? Model { get; set; }
    [JsonPropertyName("max_tokens")] public int? MaxTokens { get; set; }
    [JsonPropertyName("temperature")] public double? Temperature { get; set; }
    [JsonPropertyName("top_p")] public double? TopP { get; set; }
    [JsonPropertyName("top_k")] public int? TopK { get; set; }
    [JsonPropertyName("repetition_penalty")] public double? RepetitionPenalty { get; set; }
    [JsonPropertyName("seed")] public long? Seed { get; set; }
    [JsonPropertyName("stop")] public JsonElement? Stop { get; set; }
    [JsonPropertyName("stream")] public bool Stream { get; set; }
    [JsonPropertyName("n")] public int? N { get; set; }
    [JsonPropertyName("ignore_eos")] public bool IgnoreEos { get; set; }
    /// <summary>DslaMesh: exact, balanced or fast.</summary>
    [JsonPropertyName("fidelity")] public string? Fidelity { get; set; }
    /// <summary>DslaMesh: the largest fraction (0..1) of layers that may run as DSLA.</summary>
    [JsonPropertyName("max_dsla_fraction")] public double? MaxDslaFraction { get; set; }
}

/// <summary>POST /v1/completions body.</summary>
public sealed class CompletionRequest : OpenAiSamplingRequest
{
    /// <summary>A string, or an array of token ids.</summary>
    [JsonPropertyName("prompt")] public JsonElement? Prompt { get; set; }
    /// <summary>OpenAI: number of top logprobs; DslaMesh returns the chosen token's logprob when ≥ 0.</summary>
    [JsonPropertyName("logprobs")] public int? LogProbs { get; set; }
}

/// <summary>POST /v1/chat/completions body.</summary>
public sealed class ChatCompletionRequest : OpenAiSamplingRequest
{
    [JsonPropertyName("messages")] public List<ChatMessage>? Messages { get; set; }
    [JsonPropertyName("max_completion_tokens")] public int? MaxCompletionTokens { get; set; }
    [JsonPropertyName("logprobs")] public bool LogProbs { get; set; }
}

/// <summary>One chat message.</summary>
public sealed class ChatMessage
{
    [JsonPropertyName("role")] public string? Role { get; set; }
    [JsonPropertyName("content")] public string? Content { get; set; }
}

/// <summary>Usage block.</summary>
public sealed record UsageDto(
    [property: JsonPropertyName("prompt_tokens")] int PromptTokens,
    [property: JsonPropertyName("completion_tokens")] int CompletionTokens,
    [property: JsonPropertyName("total_tokens")] int TotalTokens);

/// <summary>DslaMesh's receipt, attached to the final response or chunk.</summary>
public sealed record ReceiptDto(
    [property: JsonPropertyName("prefill_dsla_layers")] IReadOnlyList<int> PrefillDslaLayers,
    [property: JsonPropertyName("decode_dsla_layers")] IReadOnlyList<int> DecodeDslaLayers,
    [property: JsonPropertyName("layer_count")] int LayerCount,
    [property: JsonPropertyName("kv_bytes_saved")] long KvBytesSaved,
    [property: JsonPropertyName("variant")] string Variant,
    [property: JsonPropertyName("time_to_first_token_seconds")] double TimeToFirstTokenSeconds,
    [property: JsonPropertyName("queue_seconds")] double QueueSeconds);

/// <summary>Token log-probabilities of a completion choice.</summary>
public sealed record LogProbsDto(
    [property: JsonPropertyName("tokens")] IReadOnlyList<string> Tokens,
    [property: JsonPropertyName("token_logprobs")] IReadOnlyList<float> TokenLogProbs);

/// <summary>A /v1/completions choice (also the streamed chunk choice).</summary>
public sealed record CompletionChoice(
    [property: JsonPropertyName("index")] int Index,
    [property: JsonPropertyName("text")] string Text,
    [property: JsonPropertyName("logprobs")] LogProbsDto? LogProbs,
    [property: JsonPropertyName("finish_reason")] string? FinishReason);

/// <summary>A /v1/completions response or stream chunk.</summary>
public sealed record CompletionResponse(
    [property: JsonPropertyName("id")] string Id,
    [property: JsonPropertyName("object")] string ObjectType,
    [property: JsonPropertyName("created")] long Created,
    [property: JsonPropertyName("model")] string Model,
    [property: JsonPropertyName("choices")] IReadOnlyList<CompletionChoice> Choices,
    [property: JsonPropertyName("usage"), JsonIgnore(Condition = JsonIgnoreCondition.WhenWritingNull)] UsageDto? Usage,
    [property: JsonPropertyName("dsla"), JsonIgnore(Condition = JsonIgnoreCondition.WhenWritingNull)] ReceiptDto? Dsla);

/// <summary>An assistant message or a streamed delta.</summary>
public sealed record ChatDelta(
    [property: JsonPropertyName("role"), JsonIgnore(Condition = JsonIgnoreCondition.WhenWritingNull)] string? Role,
    [property: JsonPropertyName("content"), JsonIgnore(Condition = JsonIgnoreCondition.WhenWritingNull)] string? Content);

/// <summary>A chat choice: <c>message</c> in responses, <c>delta</c> in chunks.</summary>
public sealed record ChatChoice(
    [property: JsonPropertyName("index")] int Index,
    [property: JsonPropertyName("message"), JsonIgnore(Condition = JsonIgnoreCondition.WhenWritingNull)] ChatDelta? Message,
    [property: JsonPropertyName("delta"), JsonIgnore(Condition = JsonIgnoreCondition.WhenWritingNull)] ChatDelta? Delta,
    [property: JsonPropertyName("finish_reason")] string? FinishReason);

/// <summary>A /v1/chat/completions response or stream chunk.</summary>
public sealed record ChatCompletionResponse(
    [property: JsonPropertyName("id")] string Id,
    [property: JsonPropertyName("object")] string ObjectType,
    [property: JsonPropertyName("created")] long Created,
    [property: JsonPropertyName("model")] string Model,
    [property: JsonPropertyName("choices")] IReadOnlyList<ChatChoice> Choices,
    [property: JsonPropertyName("usage"), JsonIgnore(Condition = JsonIgnoreCondition.WhenWritingNull)] UsageDto? Usage,
    [property: JsonPropertyName("dsla"), JsonIgnore(Condition = JsonIgnoreCondition.WhenWritingNull)] ReceiptDto? Dsla);

/// <summary>GET /v1/models entry.</summary>
public sealed record ModelCard(
    [property: JsonPropertyName("id")] string Id,
    [property: JsonPropertyName("object")] string ObjectType,
    [property: JsonPropertyName("created")] long Created,
    [property: JsonPropertyName("owned_by")] string OwnedBy,
    [property: JsonPropertyName("max_model_len")] int MaxModelLen,
    [property: JsonPropertyName("layer_count")] int LayerCount,
    [property: JsonPropertyName("dsla_layers")] IReadOnlyList<int> DslaLayers);

/// <summary>GET /v1/models body.</summary>
public sealed record ModelList(
    [property: JsonPropertyName("object")] string ObjectType,
    [property: JsonPropertyName("data")] IReadOnlyList<ModelCard> Data);

/// <summary>OpenAI-style error body: <c>{"error": {"message", "type", "param", "code"}}</c>.</summary>
public sealed record ErrorBody([property: JsonPropertyName("error")] ErrorDetail Error);

/// <summary>The error detail; <c>param</c> names the offending field.</summary>
public sealed record ErrorDetail(
    [property: JsonPropertyName("message")] string Message,
    [property: JsonPropertyName("type")] string Type,
    [property: JsonPropertyName("param")] string? Param,
    [property: JsonPropertyName("code")] string? Code);

/// <summary>Source-generated JSON for the OpenAI surface.</summary>
[JsonSourceGenerationOptions(NumberHandling = JsonNumberHandling.Strict, AllowTrailingCommas = false)]
[JsonSerializable(typeof(CompletionRequest))]
[JsonSerializable(typeof(ChatCompletionRequest))]
[JsonSerializable(typeof(CompletionResponse))]
[JsonSerializable(typeof(ChatCompletionResponse))]
[JsonSerializable(typeof(ModelList))]
[JsonSerializable(typeof(ErrorBody))]
public sealed partial class OpenAiJsonContext : JsonSerializerContext;

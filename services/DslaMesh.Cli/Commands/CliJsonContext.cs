using System.Text.Json.Serialization;

namespace DslaMesh.Cli.Commands;

/// <summary>Source-generated JSON for dslactl's own outputs.</summary>
[JsonSourceGenerationOptions(WriteIndented = true)]
[JsonSerializable(typeof(List<Dictionary<string, string?>>))]
[JsonSerializable(typeof(CompletionChunk))]
internal sealed partial class CliJsonContext : JsonSerializerContext;

/// <summary>The parts of an OpenAI completion chunk (SSE) that dslactl reads.</summary>
internal sealed record CompletionChunk(
    [property: JsonPropertyName("choices")] List<CompletionChunkChoice>? Choices,
    [property: JsonPropertyName("usage")] CompletionUsage? Usage,
    [property: JsonPropertyName("error")] CompletionError? Error);

internal sealed record CompletionChunkChoice(
    [property: JsonPropertyName("text")] string? Text,
    [property: JsonPropertyName("finish_reason")] string? FinishReason);

internal sealed record CompletionUsage(
    [property: JsonPropertyName("prompt_tokens")] int PromptTokens,
    [property: JsonPropertyName("completion_tokens")] int CompletionTokens);

internal sealed record CompletionError([property: JsonPropertyName("message")] string? Message);

using System.Net.Http.Json;
using System.Text;
using System.Text.Json;
using DslaMesh.Protos.V1;
using Grpc.Core;

namespace DslaMesh.Tests.Common;

/// <summary>The outcome of one SSE stream.</summary>
public sealed record SseResult(int Status, string? Replica, string Text, int Chunks, string? FinishReason, JsonElement? Error, bool Done);

/// <summary>The outcome of one gRPC stream.</summary>
public sealed record GrpcResult(string? Replica, List<int> Tokens, Completion? Completion, RpcException? Error);

/// <summary>Client helpers shared by the tests: an SSE reader and a gRPC stream reader.</summary>
public static class Clients
{
    /// <summary>POSTs a streaming completion and reads the whole event stream; <paramref name="firstChunk"/> completes at the first event.</summary>
    public static async Task<SseResult> SseAsync(HttpClient http, object body, CancellationToken ct, TaskCompletionSource<string?>? firstChunk = null, string path = "/v1/completions")
    {
        using var request = new HttpRequestMessage(HttpMethod.Post, path) { Content = JsonContent.Create(body) };
        using var response = await http.SendAsync(request, HttpCompletionOption.ResponseHeadersRead, ct);
        var replica = response.Headers.TryGetValues("x-dslamesh-replica", out var values) ? values.First() : null;
        if (!response.IsSuccessStatusCode)
        {
            firstChunk?.TrySetResult(replica);
            var errorJson = JsonDocument.Parse(await response.Content.ReadAsStringAsync(ct)).RootElement.GetProperty("error").Clone();
            return new SseResult((int)response.StatusCode, replica, "", 0, null, errorJson, false);
        }
        var text = new StringBuilder();
        var chunks = 0;
        string? finish = null;
        JsonElement? error = null;
        var done = false;
        using var reader = new StreamReader(await response.Content.ReadAsStreamAsync(ct));
        while (await reader.ReadLineAsync(ct) is { } line)
        {
            if (!line.StartsWith("data: ", StringComparison.Ordinal))
            {
                continue;
            }
            var data = line["data: ".Length..];
            if (data == "[DONE]")
            {
                done = true;
                break;
            }
            using var chunk = JsonDocument.Parse(data);
            firstChunk?.TrySetResult(replica);
            if (chunk.RootElement.TryGetProperty("error", out var e))
            {
                error = e.Clone();
                continue;
            }
            chunks++;
            var choice = chunk.RootElement.GetProperty("choices")[0];
            text.Append(choice.TryGetProperty("text", out var t) ? t.GetString() : choice.GetProperty("delta").TryGetProperty("content", out var c) ? c.GetString() : "");
            if (choice.GetProperty("finish_reason").ValueKind == JsonValueKind.String)
            {
                finish = choice.GetProperty("finish_reason").GetString();
            }
        }
        return new SseResult((int)response.StatusCode, replica, text.ToString(), chunks, finish, error, done);
    }

    /// <summary>Runs a gRPC Generate stream to the end (or its error).</summary>
    public static async Task<GrpcResult> GrpcAsync(Generation.GenerationClient client, GenerateRequest request, CallOptions options, TaskCompletionSource<string?>? firstChunk = null)
    {
        var tokens = new List<int>();
        Completion? completion = null;
        string? replica = null;
        try
        {
            using var call = client.Generate(request, options);
            var headers = await call.ResponseHeadersAsync;
            replica = headers.GetValue("x-dslamesh-replica");
            await foreach (var message in call.ResponseStream.ReadAllAsync(options.CancellationToken))
            {
                firstChunk?.TrySetResult(replica);
                tokens.AddRange(message.TokenIds);
                completion = message.Completion ?? completion;
            }
            return new GrpcResult(replica, tokens, completion, null);
        }
        catch (RpcException e)
        {
            firstChunk?.TrySetResult(replica);
            return new GrpcResult(replica, tokens, completion, e);
        }
    }

    /// <summary>A token-id prompt request.</summary>
    public static GenerateRequest Request(int maxTokens, string? model = null, params int[] prompt)
    {
        var request = new GenerateRequest { Sampling = new SamplingParams { MaxTokens = maxTokens, Temperature = 0, IgnoreEos = true } };
        request.TokenIds = new TokenIds();
        request.TokenIds.Ids.Add(prompt.Length == 0 ? [5, 6, 7] : prompt);
        if (model is not null)
        {
            request.Model = model;
        }
        return request;
    }
}

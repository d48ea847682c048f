using System.CommandLine;
using System.Globalization;
using System.Net.Http.Headers;
using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;
using DslaMesh.Engine.Inference;
using DslaMesh.Protos.V1;
using Grpc.Core;
using Grpc.Net.Client;

namespace DslaMesh.Cli.Commands;

/// <summary>Streaming generation from a remote model service or gateway, over gRPC or OpenAI HTTP (SSE).</summary>
internal static class RemoteGeneration
{
    public static async Task<int> GrpcAsync(ParseResult result, string address, SamplingParameters sampling, string? prompt, string? ids, string? fidelity, CancellationToken cancellationToken)
    {
        var output = result.InvocationConfiguration.Output;
        var error = result.InvocationConfiguration.Error;
        using var channel = GrpcChannel.ForAddress(Address(address, "--endpoint"));
        var client = new Generation.GenerationClient(channel);
        var request = new GenerateRequest
        {
            Sampling = new SamplingParams
            {
                Temperature = sampling.Temperature,
                TopP = sampling.TopP,
                TopK = sampling.TopK,
                RepetitionPenalty = sampling.RepetitionPenalty,
                MaxTokens = sampling.MaxTokens,
                Logprobs = sampling.LogProbs,
            },
            Fidelity = fidelity switch
            {
                "exact" => Fidelity.Exact,
                "fast" => Fidelity.Fast,
                "balanced" => Fidelity.Balanced,
                _ => Fidelity.Unspecified,
            },
        };
        if (sampling.Seed is { } seed)
        {
            request.Sampling.Seed = seed;
        }
        request.Sampling.Stop.Add(sampling.StopSequences);
        if (prompt is not null)
        {
            request.Prompt = prompt.Length > 0 ? prompt : throw new ArgumentException("--prompt is empty.");
        }
        else
        {
            request.TokenIds = new TokenIds();
            request.TokenIds.Ids.Add(EngineOptions.ParseIds(ids!));
        }
        try
        {
            using var call = client.Generate(request, cancellationToken: cancellationToken);
            await foreach (var message in call.ResponseStream.ReadAllAsync(cancellationToken).ConfigureAwait(false))
            {
                await output.WriteAsync(message.Text.Length > 0 || message.TokenIds.Count == 0 ? message.Text : string.Join(' ', message.TokenIds) + " ").ConfigureAwait(false);
                await output.FlushAsync(cancellationToken).ConfigureAwait(false);
                if (sampling.LogProbs)
                {
                    for (var i = 0; i < Math.Min(message.TokenIds.Count, message.Logprobs.Count); i++)
                    {
                        await error.WriteLineAsync(string.Create(CultureInfo.InvariantCulture, $"token {message.TokenIds[i]} logprob {message.Logprobs[i]:F4}")).ConfigureAwait(false);
                    }
                }
                if (message.Completion is { } completion)
                {
                    await output.WriteLineAsync().ConfigureAwait(false);
                    var receipt = completion.Receipt;
                    await error.WriteLineAsync(string.Create(CultureInfo.InvariantCulture,
                        $"[finish: {completion.FinishReason}; {completion.Usage?.PromptTokens} prompt + {completion.Usage?.CompletionTokens} completion tokens; TTFT {completion.Timings?.TimeToFirstTokenSeconds * 1000:F0} ms; DSLA layers [{string.Join(",", receipt?.DecodeDslaLayers ?? [])}] of {receipt?.LayerCount}]")).ConfigureAwait(false);
                    return completion.FinishReason == "cancelled" ? ExitCodes.Cancelled : ExitCodes.Ok;
                }
            }
            throw new RpcException(new Status(StatusCode.Internal, "the stream ended without a completion"));
        }
        catch (RpcException e) when (e.StatusCode != StatusCode.Cancelled)
        {
            var code = e.StatusCode is StatusCode.InvalidArgument or StatusCode.OutOfRange ? ExitCodes.InvalidInput : ExitCodes.ServiceError;
            await error.WriteLineAsync($"error: {e.StatusCode}: {e.Status.Detail}").ConfigureAwait(false);
            return code;
        }
    }

    public static async Task<int> HttpAsync(ParseResult result, string address, SamplingParameters sampling, string? prompt, string? ids, string? fidelity, CancellationToken cancellationToken)
    {
        var output = result.InvocationConfiguration.Output;
        var error = result.InvocationConfiguration.Error;
        var body = new JsonObject
        {
            ["max_tokens"] = sampling.MaxTokens,
            ["temperature"] = sampling.Temperature,
            ["top_p"] = sampling.TopP,
            ["top_k"] = sampling.TopK,
            ["repetition_penalty"] = sampling.RepetitionPenalty,
            ["stream"] = true,
        };
        if (sampling.Seed is { } seed)
        {
            body["seed"] = seed;
        }
        if (sampling.StopSequences.Count > 0)
        {
            body["stop"] = new JsonArray([.. sampling.StopSequences.Select(s => (JsonNode?)JsonValue.Create(s))]);
        }
        if (fidelity is not null)
        {
            body["fidelity"] = fidelity;
        }
        body["prompt"] = prompt is not null
            ? (prompt.Length > 0 ? JsonValue.Create(prompt) : throw new ArgumentException("--prompt is empty."))
            : new JsonArray([.. EngineOptions.ParseIds(ids!).Select(i => (JsonNode?)JsonValue.Create(i))]);
        using var client = new HttpClient { BaseAddress = Address(address, "--http"), Timeout = Timeout.InfiniteTimeSpan };
        using var request = new HttpRequestMessage(HttpMethod.Post, "v1/completions") { Content = new StringContent(body.ToJsonString(), Encoding.UTF8, "application/json") };
        request.Headers.Accept.Add(new MediaTypeWithQualityHeaderValue("text/event-stream"));
        try
        {
            using var response = await client.SendAsync(request, HttpCompletionOption.ResponseHeadersRead, cancellationToken).ConfigureAwait(false);
            if (!response.IsSuccessStatusCode)
            {
                var text = await response.Content.ReadAsStringAsync(cancellationToken).ConfigureAwait(false);
                var message = TryParse(text)?.Error?.Message ?? text;
                await error.WriteLineAsync($"error: HTTP {(int)response.StatusCode}: {message}").ConfigureAwait(false);
                return (int)response.StatusCode is 400 or 404 or 413 or 422 ? ExitCodes.InvalidInput : ExitCodes.ServiceError;
            }
            using var reader = new StreamReader(await response.Content.ReadAsStreamAsync(cancellationToken).ConfigureAwait(false));
            string? finish = null;
            CompletionUsage? usage = null;
            while (await reader.ReadLineAsync(cancellationToken).ConfigureAwait(false) is { } line)
            {
                if (!line.StartsWith("data: ", StringComparison.Ordinal))
                {
                    continue;
                }
                var data = line["data: ".Length..];
                if (data == "[DONE]")
                {
                    break;
                }
                var chunk = TryParse(data) ?? throw new FormatException($"unexpected SSE data: {data}");
                if (chunk.Error is { } failure)
                {
                    await error.WriteLineAsync($"error: the service failed mid-stream: {failure.Message}").ConfigureAwait(false);
                    return ExitCodes.ServiceError;
                }
                foreach (var choice in chunk.Choices ?? [])
                {
                    await output.WriteAsync(choice.Text).ConfigureAwait(false);
                    finish = choice.FinishReason ?? finish;
                }
                usage = chunk.Usage ?? usage;
                await output.FlushAsync(cancellationToken).ConfigureAwait(false);
            }
            await output.WriteLineAsync().ConfigureAwait(false);
            await error.WriteLineAsync($"[finish: {finish ?? "unknown"}{(usage is null ? "" : $"; {usage.PromptTokens} prompt + {usage.CompletionTokens} completion tokens")}]").ConfigureAwait(false);
            return ExitCodes.Ok;
        }
        catch (HttpRequestException e)
        {
            await error.WriteLineAsync($"error: cannot reach {address}: {e.Message}").ConfigureAwait(false);
            return ExitCodes.ServiceError;
        }
    }

    private static CompletionChunk? TryParse(string json)
    {
        try
        {
            return JsonSerializer.Deserialize(json, CliJsonContext.Default.CompletionChunk);
        }
        catch (JsonException)
        {
            return null;
        }
    }

    private static Uri Address(string text, string option) =>
        Uri.TryCreate(text.EndsWith('/') ? text : text + "/", UriKind.Absolute, out var uri) && uri.Scheme is "http" or "https"
            ? uri
            : throw new ArgumentException($"{option}: '{text}' is not an http:// or https:// URL.");
}

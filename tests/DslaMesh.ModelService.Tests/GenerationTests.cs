using System.Net;
using System.Net.Http.Json;
using System.Text.Json;
using DslaMesh.Engine.Inference;
using DslaMesh.Protos.V1;
using DslaMesh.Tests.Common;
using Grpc.Core;

namespace DslaMesh.ModelService.Tests;

/// <summary>Streaming generation over gRPC and OpenAI HTTP on a real Kestrel host.</summary>
public sealed class GenerationTests : IClassFixture<ServiceFixture>
{
    private readonly ServiceFixture _fixture;

    public GenerationTests(ServiceFixture fixture) => _fixture = fixture;

    [Fact]
    public async Task Concurrent_grpc_and_http_streams_produce_the_engine_alone_tokens()
    {
        await using var service = await ModelServiceHost.StartAsync(_fixture.ModelPath, null);
        var ct = TestContext.Current.CancellationToken;
        var prompts = Enumerable.Range(0, 6).Select(i => Enumerable.Range(5 + (9 * i), 4 + i).ToArray()).ToArray();
        // Even streams over gRPC (token ids), odd ones over HTTP SSE (text), all at once.
        var grpc = prompts.Select((p, i) => i % 2 == 0 ? GrpcTokens(service, p, 40 + i, ct) : Task.FromResult(new List<int>())).ToArray();
        var sse = prompts.Select((p, i) => i % 2 == 1 ? SseText(service, p, 40 + i, ct) : Task.FromResult("")).ToArray();
        await Task.WhenAll(grpc.Cast<Task>().Concat(sse));
        using var tokenizer = _fixture.Tokenizer();
        for (var i = 0; i < prompts.Length; i++)
        {
            var expected = _fixture.Reference(prompts[i], new SamplingParameters { Temperature = 0.8, Seed = 40 + i, MaxTokens = 20, IgnoreEos = true });
            if (i % 2 == 0)
            {
                Assert.Equal(expected, await grpc[i]);
            }
            else
            {
                Assert.Equal(tokenizer.Decode(expected), await sse[i]);
            }
        }
    }

    [Fact]
    public async Task Non_streaming_completion_and_chat_return_openai_json_with_receipt()
    {
        await using var service = await ModelServiceHost.StartAsync(_fixture.ModelPath, null);
        var ct = TestContext.Current.CancellationToken;
        var response = await service.Http.PostAsJsonAsync("/v1/completions", new { prompt = "The quick", max_tokens = 8, temperature = 0, logprobs = 1 }, ct);
        Assert.Equal(HttpStatusCode.OK, response.StatusCode);
        using var json = JsonDocument.Parse(await response.Content.ReadAsStringAsync(ct));
        var root = json.RootElement;
        Assert.Equal("text_completion", root.GetProperty("object").GetString());
        var choice = root.GetProperty("choices")[0];
        using var tokenizer = _fixture.Tokenizer();
        var expected = _fixture.Reference(tokenizer.Encode("The quick"), SamplingParameters.Greedy(8));
        Assert.Equal(tokenizer.Decode(expected), choice.GetProperty("text").GetString());
        Assert.Equal(8, choice.GetProperty("logprobs").GetProperty("token_logprobs").GetArrayLength());
        Assert.Equal(8, root.GetProperty("usage").GetProperty("completion_tokens").GetInt32());
        Assert.Equal(2, root.GetProperty("dsla").GetProperty("layer_count").GetInt32());

        var chat = await service.Http.PostAsJsonAsync("/v1/chat/completions", new { messages = new[] { new { role = "user", content = "Hello" } }, max_tokens = 5, temperature = 0 }, ct);
        Assert.Equal(HttpStatusCode.OK, chat.StatusCode);
        using var chatJson = JsonDocument.Parse(await chat.Content.ReadAsStringAsync(ct));
        Assert.Equal("chat.completion", chatJson.RootElement.GetProperty("object").GetString());
        Assert.Equal("assistant", chatJson.RootElement.GetProperty("choices")[0].GetProperty("message").GetProperty("role").GetString());

        var models = await service.Http.GetFromJsonAsync<JsonElement>("/v1/models", ct);
        Assert.Equal(new DirectoryInfo(_fixture.ModelPath).Name, models.GetProperty("data")[0].GetProperty("id").GetString());
    }

    [Fact]
    public async Task Streaming_chat_ends_with_done_and_carries_the_receipt()
    {
        await using var service = await ModelServiceHost.StartAsync(_fixture.ModelPath, null);
        var ct = TestContext.Current.CancellationToken;
        using var request = new HttpRequestMessage(HttpMethod.Post, "/v1/chat/completions")
        {
            Content = JsonContent.Create(new { messages = new[] { new { role = "user", content = "Hi" } }, max_tokens = 6, temperature = 0, stream = true }),
        };
        using var response = await service.Http.SendAsync(request, HttpCompletionOption.ResponseHeadersRead, ct);
        Assert.Equal("text/event-stream", response.Content.Headers.ContentType?.MediaType);
        var events = (await response.Content.ReadAsStringAsync(ct)).Split("\n\n", StringSplitOptions.RemoveEmptyEntries);
        Assert.Equal("data: [DONE]", events[^1]);
        using var last = JsonDocument.Parse(events[^2]["data: ".Length..]);
        Assert.Equal("chat.completion.chunk", last.RootElement.GetProperty("object").GetString());
        Assert.Equal("length", last.RootElement.GetProperty("choices")[0].GetProperty("finish_reason").GetString());
        Assert.True(last.RootElement.TryGetProperty("dsla", out _));
        using var first = JsonDocument.Parse(events[0]["data: ".Length..]);
        Assert.Equal("assistant", first.RootElement.GetProperty("choices")[0].GetProperty("delta").GetProperty("role").GetString());
    }

    private static async Task<List<int>> GrpcTokens(ModelServiceHost service, int[] prompt, int seed, CancellationToken ct)
    {
        var request = new GenerateRequest { TokenIds = new TokenIds(), Sampling = new SamplingParams { Temperature = 0.8, Seed = seed, MaxTokens = 20, IgnoreEos = true } };
        request.TokenIds.Ids.Add(prompt);
        using var call = service.Generation.Generate(request, cancellationToken: ct);
        var tokens = new List<int>();
        Completion? completion = null;
        await foreach (var message in call.ResponseStream.ReadAllAsync(ct))
        {
            tokens.AddRange(message.TokenIds);
            completion = message.Completion ?? completion;
        }
        Assert.NotNull(completion);
        Assert.Equal("length", completion.FinishReason);
        Assert.Equal(20, completion.Usage.CompletionTokens);
        return tokens;
    }

    private static async Task<string> SseText(ModelServiceHost service, int[] prompt, int seed, CancellationToken ct)
    {
        var stream = await Clients.SseAsync(service.Http, new { prompt, max_tokens = 20, temperature = 0.8, seed, stream = true, ignore_eos = true }, ct);
        Assert.Equal((int)HttpStatusCode.OK, stream.Status);
        Assert.Null(stream.Error);
        Assert.True(stream.Done, "the SSE stream did not end with data: [DONE]");
        return stream.Text;
    }
}

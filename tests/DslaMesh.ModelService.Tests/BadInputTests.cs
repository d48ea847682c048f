using System.Net;
using System.Net.Http.Json;
using System.Text;
using System.Text.Json;
using DslaMesh.Protos.V1;
using DslaMesh.Tests.Common;
using Grpc.Core;

namespace DslaMesh.ModelService.Tests;

/// <summary>Bad input gets a clear 4xx or gRPC status naming the field, and the service keeps serving.</summary>
public sealed class BadInputTests : IClassFixture<ServiceFixture>, IAsyncLifetime
{
    private readonly ServiceFixture _fixture;
    private ModelServiceHost _service = null!;

    public BadInputTests(ServiceFixture fixture) => _fixture = fixture;

    public async ValueTask InitializeAsync() => _service = await ModelServiceHost.StartAsync(_fixture.ModelPath, null, new Dictionary<string, string?> { ["ModelService:MaxRequestBodyBytes"] = "4096" });

    public async ValueTask DisposeAsync() => await _service.DisposeAsync();

    public static TheoryData<string, int, string?, string> HttpCases => new()
    {
        { """{"prompt":[5,6],"max_tokens":255}""", 400, "max_tokens", "257" },
        { """{"prompt":"","max_tokens":4}""", 400, "prompt", "empty" },
        { """{"max_tokens":4}""", 400, "prompt", "required" },
        { """{"prompt":"hi","temperature":-1}""", 400, "temperature", "temperature" },
        { """{"prompt":"hi","top_p":0}""", 400, "top_p", "top_p" },
        { """{"prompt":"hi","max_tokens":0}""", 400, "max_tokens", "max_tokens" },
        { """{"prompt":"hi","model":"gpt-4"}""", 404, "model", "gpt-4" },
        { """{"prompt":"hi","fidelity":"turbo"}""", 400, "fidelity", "turbo" },
        { """{"prompt":"hi","max_dsla_fraction":2}""", 400, "max_dsla_fraction", "between 0 and 1" },
        { """{"prompt":"hi","stop":5}""", 400, "stop", "stop" },
        { """{"prompt":[5,9999]}""", 400, "prompt", "9999" },
        { """{"prompt":"hi","temperature":"hot"}""", 400, "temperature", "malformed JSON" },
        { """{"prompt":"hi",""", 400, null, "malformed JSON" },
    };

    [Theory]
    [MemberData(nameof(HttpCases))]
    public async Task Http_rejections_name_the_field(string body, int status, string? param, string messagePart)
    {
        var ct = TestContext.Current.CancellationToken;
        var response = await _service.Http.PostAsync("/v1/completions", new StringContent(body, Encoding.UTF8, "application/json"), ct);
        Assert.Equal(status, (int)response.StatusCode);
        using var json = JsonDocument.Parse(await response.Content.ReadAsStringAsync(ct));
        var error = json.RootElement.GetProperty("error");
        if (param is not null)
        {
            Assert.Equal(param, error.GetProperty("param").GetString());
        }
        Assert.Contains(messagePart, error.GetProperty("message").GetString(), StringComparison.OrdinalIgnoreCase);
        await ServiceStillAnswers(ct);
    }

    [Fact]
    public async Task Context_overflow_names_both_counts()
    {
        var ct = TestContext.Current.CancellationToken;
        var response = await _service.Http.PostAsJsonAsync("/v1/completions", new { prompt = Enumerable.Repeat(5, 200).ToArray(), max_tokens = 100 }, ct);
        var message = (await response.Content.ReadFromJsonAsync<JsonElement>(ct)).GetProperty("error").GetProperty("message").GetString()!;
        Assert.Contains("200 in the prompt", message);
        Assert.Contains("100 max_tokens", message);
        Assert.Contains("256", message);
    }

    [Fact]
    public async Task Invalid_utf8_oversize_body_and_wrong_content_type_are_4xx()
    {
        var ct = TestContext.Current.CancellationToken;
        var invalid = new ByteArrayContent([.. "{\"prompt\":\""u8, 0xff, 0xfe, .. "\"}"u8]);
        invalid.Headers.ContentType = new("application/json");
        var bad = await _service.Http.PostAsync("/v1/completions", invalid, ct);
        Assert.Equal(HttpStatusCode.BadRequest, bad.StatusCode);
        Assert.Contains("UTF-8", await bad.Content.ReadAsStringAsync(ct));

        var huge = await _service.Http.PostAsync("/v1/completions", new StringContent($"{{\"prompt\":\"{new string('a', 10_000)}\"}}", Encoding.UTF8, "application/json"), ct);
        Assert.Equal(HttpStatusCode.RequestEntityTooLarge, huge.StatusCode);

        var text = await _service.Http.PostAsync("/v1/completions", new StringContent("prompt=hi", Encoding.UTF8, "text/plain"), ct);
        Assert.Equal(HttpStatusCode.UnsupportedMediaType, text.StatusCode);

        var chat = await _service.Http.PostAsJsonAsync("/v1/chat/completions", new { messages = new[] { new { role = "robot", content = "x" } } }, ct);
        Assert.Equal(HttpStatusCode.BadRequest, chat.StatusCode);
        Assert.Equal("messages[0].role", (await chat.Content.ReadFromJsonAsync<JsonElement>(ct)).GetProperty("error").GetProperty("param").GetString());
        await ServiceStillAnswers(ct);
    }

    [Fact]
    public async Task Grpc_rejections_are_invalid_argument_naming_the_field()
    {
        var ct = TestContext.Current.CancellationToken;
        async Task<RpcException> Fail(GenerateRequest request) => await Assert.ThrowsAsync<RpcException>(async () =>
        {
            using var call = _service.Generation.Generate(request, cancellationToken: ct);
            await foreach (var _ in call.ResponseStream.ReadAllAsync(ct))
            {
            }
        });
        var overflow = await Fail(new GenerateRequest { Prompt = "hi", Sampling = new SamplingParams { MaxTokens = 1000 } });
        Assert.Equal(StatusCode.InvalidArgument, overflow.StatusCode);
        Assert.Contains("max_tokens", overflow.Status.Detail);
        var empty = await Fail(new GenerateRequest { Sampling = new SamplingParams { MaxTokens = 4 } });
        Assert.Contains("prompt", empty.Status.Detail);
        var sampling = await Fail(new GenerateRequest { Prompt = "hi", Sampling = new SamplingParams { MaxTokens = 4, TopP = 5 } });
        Assert.Contains("top_p", sampling.Status.Detail);
        var missing = await Fail(new GenerateRequest { Prompt = "hi" });
        Assert.Contains("sampling", missing.Status.Detail);
        var model = await Fail(new GenerateRequest { Prompt = "hi", Model = "other", Sampling = new SamplingParams { MaxTokens = 4 } });
        Assert.Equal(StatusCode.NotFound, model.StatusCode);
        await ServiceStillAnswers(ct);
    }

    private async Task ServiceStillAnswers(CancellationToken ct)
    {
        var ok = await _service.Http.PostAsJsonAsync("/v1/completions", new { prompt = new[] { 5, 6 }, max_tokens = 2 }, ct);
        Assert.Equal(HttpStatusCode.OK, ok.StatusCode);
    }
}

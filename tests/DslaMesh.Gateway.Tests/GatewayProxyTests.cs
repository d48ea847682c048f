using System.Diagnostics;
using System.Net;
using System.Net.Http.Headers;
using System.Net.Http.Json;
using System.Text;
using System.Text.Json;
using DslaMesh.Fleet;
using DslaMesh.Gateway.Discovery;
using DslaMesh.Protos.V1;
using DslaMesh.Tests.Common;
using Grpc.Core;
using StackExchange.Redis;

namespace DslaMesh.Gateway.Tests;

/// <summary>Clients → gateway → two real model-service processes, over HTTP SSE and gRPC, with keys and limits.</summary>
public sealed class GatewayProxyTests : IClassFixture<MeshFixture>
{
    private readonly MeshFixture _mesh;

    public GatewayProxyTests(MeshFixture mesh) => _mesh = mesh;

    [Fact]
    public async Task Sse_stream_through_the_gateway_equals_the_replica_answering_directly()
    {
        var ct = TestContext.Current.CancellationToken;
        var body = new { prompt = new[] { 5, 6, 7, 8 }, max_tokens = 24, temperature = 0, ignore_eos = true, stream = true };
        var proxied = await Clients.SseAsync(_mesh.Gateway.Http, body, ct);
        Assert.Equal(200, proxied.Status);
        Assert.Contains(proxied.Replica, new[] { _mesh.A.Id, _mesh.B.Id });
        Assert.True(proxied.Done, "no [DONE]");
        Assert.Null(proxied.Error);
        Assert.Equal("length", proxied.FinishReason);

        // The same request straight to the replica that served it.
        using var direct = new HttpClient { BaseAddress = proxied.Replica == _mesh.A.Id ? _mesh.A.Address : _mesh.B.Address };
        var expected = await Clients.SseAsync(direct, body, ct);
        Assert.True(expected.Text == proxied.Text && expected.Chunks == proxied.Chunks,
            $"via gateway ({proxied.Replica}): {proxied.Chunks} chunks '{proxied.Text}'; direct: {expected.Chunks} chunks '{expected.Text}'");

        var chat = await Clients.SseAsync(_mesh.Gateway.Http, new { messages = new[] { new { role = "user", content = "Hi" } }, max_tokens = 6, temperature = 0, stream = true }, ct, path: "/v1/chat/completions");
        Assert.Equal(200, chat.Status);
        Assert.True(chat.Done);
    }

    [Fact]
    public async Task Grpc_stream_through_the_h2c_endpoint_carries_tokens_and_the_receipt()
    {
        var ct = TestContext.Current.CancellationToken;
        var result = await Clients.GrpcAsync(_mesh.Gateway.Generation, Clients.Request(20), GatewayHost.WithKey(ct));
        Assert.Null(result.Error);
        Assert.Equal(20, result.Tokens.Count);
        Assert.Equal("length", result.Completion!.FinishReason);
        Assert.Equal(2, result.Completion.Receipt.LayerCount);
        Assert.Contains(result.Replica, new[] { _mesh.A.Id, _mesh.B.Id });

        // The same request straight to a replica gives the same greedy tokens.
        using var channel = Grpc.Net.Client.GrpcChannel.ForAddress(_mesh.B.GrpcAddress);
        var direct = await Clients.GrpcAsync(new Generation.GenerationClient(channel), Clients.Request(20), new CallOptions(cancellationToken: ct));
        Assert.Equal(direct.Tokens, result.Tokens);

        // Only generation is public: layer control stays behind the gateway.
        var control = new LayerControl.LayerControlClient(_mesh.Gateway.Channel);
        var hidden = await Assert.ThrowsAsync<RpcException>(async () => await control.GetStateAsync(new GetStateRequest(), GatewayHost.WithKey(ct)));
        Assert.Equal(StatusCode.Unimplemented, hidden.StatusCode);
    }

    [Fact]
    public async Task Non_streaming_json_and_the_fleet_model_list()
    {
        var ct = TestContext.Current.CancellationToken;
        var response = await _mesh.Gateway.Http.PostAsJsonAsync("/v1/completions", new { prompt = "The quick", max_tokens = 5, temperature = 0 }, ct);
        Assert.Equal(HttpStatusCode.OK, response.StatusCode);
        var json = await response.Content.ReadFromJsonAsync<JsonElement>(ct);
        Assert.Equal(5, json.GetProperty("usage").GetProperty("completion_tokens").GetInt32());

        var models = await _mesh.Gateway.Http.GetFromJsonAsync<JsonElement>("/v1/models", ct);
        var model = Assert.Single(models.GetProperty("data").EnumerateArray());
        Assert.Equal("llama-gqa-untied", model.GetProperty("id").GetString());
        Assert.Equal(2, model.GetProperty("replicas").GetInt32());

        // A replica's own 4xx passes through untouched (and is not retried elsewhere).
        var bad = await _mesh.Gateway.Http.PostAsJsonAsync("/v1/completions", new { prompt = "hi", fidelity = "turbo" }, ct);
        Assert.Equal(HttpStatusCode.BadRequest, bad.StatusCode);
        Assert.Equal("fidelity", (await bad.Content.ReadFromJsonAsync<JsonElement>(ct)).GetProperty("error").GetProperty("param").GetString());
    }

    [Fact]
    public async Task Missing_or_wrong_key_is_401_with_an_openai_error_and_grpc_unauthenticated()
    {
        var ct = TestContext.Current.CancellationToken;
        using var anonymous = new HttpClient { BaseAddress = _mesh.Gateway.Address };
        var body = new { prompt = "hi", max_tokens = 2 };
        var missing = await anonymous.PostAsJsonAsync("/v1/completions", body, ct);
        Assert.Equal(HttpStatusCode.Unauthorized, missing.StatusCode);
        var error = (await missing.Content.ReadFromJsonAsync<JsonElement>(ct)).GetProperty("error");
        Assert.Equal("invalid_api_key", error.GetProperty("code").GetString());
        Assert.Equal("invalid_request_error", error.GetProperty("type").GetString());
        Assert.Contains("didn't provide an API key", error.GetProperty("message").GetString());

        using var wrong = new HttpRequestMessage(HttpMethod.Post, "/v1/completions") { Content = JsonContent.Create(body) };
        wrong.Headers.Authorization = new AuthenticationHeaderValue("Bearer", "not-a-key-0123456789");
        var wrongResponse = await anonymous.SendAsync(wrong, ct);
        Assert.Equal(HttpStatusCode.Unauthorized, wrongResponse.StatusCode);
        Assert.Contains("Incorrect API key", await wrongResponse.Content.ReadAsStringAsync(ct));
        Assert.Equal(HttpStatusCode.Unauthorized, (await anonymous.GetAsync("/v1/models", ct)).StatusCode);

        using var header = new HttpRequestMessage(HttpMethod.Post, "/v1/completions") { Content = JsonContent.Create(body) };
        header.Headers.Add("x-api-key", GatewayHost.Key);
        Assert.Equal(HttpStatusCode.OK, (await anonymous.SendAsync(header, ct)).StatusCode);

        foreach (var key in new[] { null, "wrong-key-0123456789" })
        {
            var grpc = await Clients.GrpcAsync(_mesh.Gateway.Generation, Clients.Request(2), GatewayHost.WithKey(ct, key));
            Assert.Equal(StatusCode.Unauthenticated, grpc.Error?.StatusCode);
        }
        // Health stays open for probes.
        Assert.Equal(HttpStatusCode.OK, (await anonymous.GetAsync("/health", ct)).StatusCode);
    }

    [Fact]
    public async Task Rate_limited_key_gets_429_with_retry_after_and_grpc_resource_exhausted_while_others_pass()
    {
        var ct = TestContext.Current.CancellationToken;
        using var tiny = new HttpClient { BaseAddress = _mesh.Gateway.Address };
        tiny.DefaultRequestHeaders.Authorization = new AuthenticationHeaderValue("Bearer", GatewayHost.TinyKey);
        var statuses = new List<HttpStatusCode>();
        HttpResponseMessage? limited = null;
        for (var i = 0; i < 3; i++)
        {
            var response = await tiny.PostAsJsonAsync("/v1/completions", new { prompt = "hi", max_tokens = 1 }, ct);
            statuses.Add(response.StatusCode);
            limited = response;
        }
        Assert.Equal([HttpStatusCode.OK, HttpStatusCode.OK, HttpStatusCode.TooManyRequests], statuses);
        Assert.True(limited!.Headers.RetryAfter?.Delta >= TimeSpan.FromSeconds(1), $"Retry-After: {limited.Headers.RetryAfter}");
        var error = (await limited.Content.ReadFromJsonAsync<JsonElement>(ct)).GetProperty("error");
        Assert.Equal("rate_limit_error", error.GetProperty("type").GetString());
        Assert.Equal("rate_limit_exceeded", error.GetProperty("code").GetString());

        var grpc = await Clients.GrpcAsync(_mesh.Gateway.Generation, Clients.Request(1), GatewayHost.WithKey(ct, GatewayHost.TinyKey));
        Assert.Equal(StatusCode.ResourceExhausted, grpc.Error?.StatusCode);

        var other = await _mesh.Gateway.Http.PostAsJsonAsync("/v1/completions", new { prompt = "hi", max_tokens = 1 }, ct);
        Assert.Equal(HttpStatusCode.OK, other.StatusCode);
    }

    [Fact]
    public async Task Oversize_body_is_413_before_reaching_a_replica()
    {
        var ct = TestContext.Current.CancellationToken;
        var response = await _mesh.Gateway.Http.PostAsync("/v1/completions", new StringContent($"{{\"prompt\":\"{new string('a', 70_000)}\"}}", Encoding.UTF8, "application/json"), ct);
        Assert.Equal(HttpStatusCode.RequestEntityTooLarge, response.StatusCode);
        Assert.Equal("request_too_large", (await response.Content.ReadFromJsonAsync<JsonElement>(ct)).GetProperty("error").GetProperty("code").GetString());
        Assert.False(response.Headers.Contains("x-dslamesh-replica"));
        // The unread body makes the connection unusable: the answer says so, and the next request still succeeds.
        Assert.True(response.Headers.ConnectionClose, "413 without Connection: close");
        var next = await _mesh.Gateway.Http.PostAsJsonAsync("/v1/completions", new { prompt = "hi", max_tokens = 1 }, ct);
        Assert.Equal(HttpStatusCode.OK, next.StatusCode);
    }

    [Fact]
    public async Task Replica_appearing_in_and_leaving_redis_is_routed_to_and_away_from_within_two_seconds()
    {
        var ct = TestContext.Current.CancellationToken;
        await using var redis = await ConnectionMultiplexer.ConnectAsync(_mesh.Redis.Configuration);
        var db = redis.GetDatabase();
        var key = FleetKeys.Service(_mesh.Prefix, "replica-c");
        await using var c = await ModelServiceProcess.StartAsync("replica-c", _mesh.Redis.Configuration, _mesh.Prefix, modelName: "mesh-c", cancellationToken: ct);

        // Appear: from the registration landing in Redis to requests for its model being answered by it.
        var registered = await WaitAsync(() => db.KeyExists(key), ct);
        var appeared = Stopwatch.StartNew();
        while (true)
        {
            var result = await Clients.GrpcAsync(_mesh.Gateway.Generation, Clients.Request(2, "mesh-c"), GatewayHost.WithKey(ct));
            if (result.Error is null && result.Replica == "replica-c")
            {
                break;
            }
            Assert.True(appeared.Elapsed < TimeSpan.FromSeconds(2), $"not routed to replica-c {appeared.Elapsed.TotalMilliseconds:F0} ms after it registered ({result.Error?.Status})");
            await Task.Delay(20, ct);
        }
        var appearMs = appeared.Elapsed.TotalMilliseconds;
        Assert.Contains("replica-c", _mesh.Gateway.Destinations(FleetProxyConfigProvider.GrpcCluster));

        // Leave: a graceful stop deregisters; from the key's removal to the gateway no longer routing there.
        var stopping = c.StopAsync();
        await WaitAsync(() => !db.KeyExists(key), ct);
        var left = Stopwatch.StartNew();
        while (_mesh.Gateway.Destinations().Contains("replica-c") || _mesh.Gateway.Destinations(FleetProxyConfigProvider.GrpcCluster).Contains("replica-c"))
        {
            Assert.True(left.Elapsed < TimeSpan.FromSeconds(2), "still routing to replica-c 2 s after it left Redis");
            await Task.Delay(20, ct);
        }
        await stopping;
        var gone = await Clients.GrpcAsync(_mesh.Gateway.Generation, Clients.Request(2, "mesh-c"), GatewayHost.WithKey(ct));
        Assert.NotEqual("replica-c", gone.Replica);
        TestContext.Current.SendDiagnosticMessage($"appear→routed {appearMs:F0} ms, leave→unrouted {left.Elapsed.TotalMilliseconds:F0} ms (registered after {registered.TotalMilliseconds:F0} ms)");
    }

    [Fact]
    public async Task One_tls_port_serves_openai_over_http11_and_grpc_over_http2_by_alpn()
    {
        var ct = TestContext.Current.CancellationToken;
        var port = DslaMesh.Tests.Common.RedisServer.FreePort();
        var pfx = Path.Combine(Path.GetTempPath(), $"dslamesh-gateway-{port}.pfx");
        string thumbprint;
        using (var rsa = System.Security.Cryptography.RSA.Create(2048))
        {
            var request = new System.Security.Cryptography.X509Certificates.CertificateRequest("CN=localhost", rsa, System.Security.Cryptography.HashAlgorithmName.SHA256, System.Security.Cryptography.RSASignaturePadding.Pkcs1);
            var names = new System.Security.Cryptography.X509Certificates.SubjectAlternativeNameBuilder();
            names.AddIpAddress(IPAddress.Loopback);
            names.AddDnsName("localhost");
            request.CertificateExtensions.Add(names.Build());
            using var certificate = request.CreateSelfSigned(DateTimeOffset.UtcNow.AddDays(-1), DateTimeOffset.UtcNow.AddDays(1));
            thumbprint = certificate.GetCertHashString();
            await File.WriteAllBytesAsync(pfx, certificate.Export(System.Security.Cryptography.X509Certificates.X509ContentType.Pfx, "test"), ct);
        }
        try
        {
            await using var gateway = await GatewayHost.StartAsync(_mesh.Redis.Configuration, _mesh.Prefix, new Dictionary<string, string?>
            {
                ["Kestrel:Endpoints:Https:Url"] = $"https://127.0.0.1:{port}",
                ["Kestrel:Endpoints:Https:Protocols"] = "Http1AndHttp2",
                ["Kestrel:Endpoints:Https:Certificate:Path"] = pfx,
                ["Kestrel:Endpoints:Https:Certificate:Password"] = "test",
            });
            await gateway.WaitForReplicasAsync([_mesh.A.Id, _mesh.B.Id], ct);
            var address = new Uri($"https://127.0.0.1:{port}");
            using var http = new HttpClient(new SocketsHttpHandler { SslOptions = { RemoteCertificateValidationCallback = (_, certificate, _, _) => certificate?.GetCertHashString() == thumbprint } }) { BaseAddress = address };
            http.DefaultRequestHeaders.Authorization = new AuthenticationHeaderValue("Bearer", GatewayHost.Key);
            var sse = await Clients.SseAsync(http, new { prompt = new[] { 5, 6 }, max_tokens = 4, stream = true }, ct);
            Assert.Equal(200, sse.Status);
            Assert.True(sse.Done);

            using var channel = Grpc.Net.Client.GrpcChannel.ForAddress(address, new Grpc.Net.Client.GrpcChannelOptions
            {
                HttpHandler = new SocketsHttpHandler { SslOptions = { RemoteCertificateValidationCallback = (_, certificate, _, _) => certificate?.GetCertHashString() == thumbprint } },
            });
            var grpc = await Clients.GrpcAsync(new Generation.GenerationClient(channel), Clients.Request(4), GatewayHost.WithKey(ct));
            Assert.Null(grpc.Error);
            Assert.Equal(4, grpc.Tokens.Count);
        }
        finally
        {
            File.Delete(pfx);
        }
    }

    private static async Task<TimeSpan> WaitAsync(Func<bool> condition, CancellationToken ct, double seconds = 30)
    {
        var watch = Stopwatch.StartNew();
        while (!condition())
        {
            Assert.True(watch.Elapsed < TimeSpan.FromSeconds(seconds), "condition not met in time");
            await Task.Delay(10, ct);
        }
        return watch.Elapsed;
    }
}

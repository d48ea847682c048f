using System.Text;
using DslaMesh.Fleet;
using DslaMesh.Gateway.Discovery;
using DslaMesh.Gateway.Hosting;
using DslaMesh.Gateway.Routing;
using DslaMesh.Protos.V1;
using DslaMesh.Tests.Common;
using Google.Protobuf;
using Microsoft.AspNetCore.Http;
using Microsoft.Extensions.Options;
using Microsoft.Extensions.Time.Testing;
using Yarp.ReverseProxy.Model;

namespace DslaMesh.Gateway.Tests;

/// <summary>The metrics-aware policy and the request traits it reads, without any server.</summary>
public sealed class RoutingPolicyTests
{
    private readonly FakeTimeProvider _time = new(DateTimeOffset.Parse("2026-01-01T00:00:00Z", System.Globalization.CultureInfo.InvariantCulture));
    private readonly FleetView _fleet;
    private readonly MeshLoadBalancingPolicy _policy;
    private readonly DestinationState[] _destinations = [new("softmax"), new("half-dsla")];
    private long _published;

    public RoutingPolicyTests()
    {
        _fleet = new FleetView(_time);
        _fleet.SetReplicas(new Dictionary<string, ServiceRegistration>
        {
            ["softmax"] = Registration("softmax", "m"),
            ["half-dsla"] = Registration("half-dsla", "m"),
        });
        _policy = new MeshLoadBalancingPolicy(_fleet, Options.Create(new GatewayOptions()), new Random(7));
    }

    [Fact]
    public void Exact_requests_prefer_the_replica_with_fewer_dsla_layers_even_when_it_is_busier()
    {
        Publish("softmax", running: 8, dsla: [], kvUsed: 40);
        Publish("half-dsla", running: 2, dsla: [2, 3], kvUsed: 10);
        Assert.Equal("softmax", Pick(new RequestTraits(null, 100, RequestFidelity.Exact, null)));
        // Without the fidelity constraint the idle replica wins.
        Assert.Equal("half-dsla", Pick(new RequestTraits(null, 100, RequestFidelity.Balanced, null)));
        // max_dsla_fraction 0.5 tolerates the half-DSLA replica.
        Assert.Equal("half-dsla", Pick(new RequestTraits(null, 100, RequestFidelity.Unspecified, 0.5)));
    }

    [Fact]
    public void Long_prompts_prefer_more_dsla_and_free_kv_while_short_ones_follow_load()
    {
        Publish("softmax", running: 4, dsla: [], kvUsed: 50);
        Publish("half-dsla", running: 6, dsla: [2, 3], kvUsed: 40);
        Assert.Equal("half-dsla", Pick(new RequestTraits(null, 16_000, RequestFidelity.Unspecified, null)));
        Assert.Equal("softmax", Pick(new RequestTraits(null, 50, RequestFidelity.Unspecified, null)));
    }

    [Fact]
    public void Requests_sent_since_the_last_metrics_count_as_load_so_a_burst_spreads()
    {
        Publish("softmax", running: 0, dsla: [], kvUsed: 0);
        Publish("half-dsla", running: 0, dsla: [], kvUsed: 0);
        var picks = Enumerable.Range(0, 10).Select(_ => Pick(RequestTraits.Unknown)).ToList();
        Assert.Equal(5, picks.Count(p => p == "softmax"));
    }

    [Fact]
    public void Stale_metrics_fall_back_to_power_of_two_choices_on_in_flight_requests()
    {
        Publish("softmax", running: 0, dsla: [], kvUsed: 0);
        Publish("half-dsla", running: 30, dsla: [], kvUsed: 0);
        Assert.Equal("softmax", Pick(RequestTraits.Unknown));
        _time.Advance(TimeSpan.FromSeconds(4));
        // Metrics say softmax is idle, but they are old; what the gateway itself has in flight decides.
        _destinations[0].ConcurrentRequestCount = 9;
        _destinations[1].ConcurrentRequestCount = 1;
        Assert.All(Enumerable.Range(0, 5), _ => Assert.Equal("half-dsla", Pick(RequestTraits.Unknown)));
    }

    [Fact]
    public void Draining_replicas_and_replicas_of_other_models_are_skipped_while_others_remain()
    {
        _fleet.SetReplicas(new Dictionary<string, ServiceRegistration> { ["softmax"] = Registration("softmax", "m"), ["half-dsla"] = Registration("half-dsla", "other") });
        Publish("softmax", running: 30, dsla: [], kvUsed: 90);
        Publish("half-dsla", running: 0, dsla: [], kvUsed: 0);
        Assert.Equal("softmax", Pick(new RequestTraits("m", 10, RequestFidelity.Unspecified, null)));
        Assert.Equal("half-dsla", Pick(new RequestTraits("other", 10, RequestFidelity.Unspecified, null)));
        // An unknown model goes anywhere (the replica answers 404).
        Assert.NotNull(Pick(new RequestTraits("nope", 10, RequestFidelity.Unspecified, null)));

        _fleet.SetReplicas(new Dictionary<string, ServiceRegistration> { ["softmax"] = Registration("softmax", "m"), ["half-dsla"] = Registration("half-dsla", "m") });
        Publish("softmax", running: 30, dsla: [], kvUsed: 90);
        Publish("half-dsla", running: 0, dsla: [], kvUsed: 0, draining: true);
        Assert.Equal("softmax", Pick(RequestTraits.Unknown));
    }

    [Fact]
    public void Traits_come_from_openai_json_and_grpc_frames()
    {
        var json = RequestTraits.FromOpenAiJson(Encoding.UTF8.GetBytes("""{"model":"m","stream":true,"options":{"prompt":"x"},"prompt":"abcdefghijklmnop","fidelity":"EXACT","max_dsla_fraction":0.25}"""), 4);
        Assert.Equal(new RequestTraits("m", 4, RequestFidelity.Exact, 0.25), json);
        var chat = RequestTraits.FromOpenAiJson(Encoding.UTF8.GetBytes("""{"messages":[{"role":"user","content":"0123456789012345678901234567"}],"fidelity":"fast"}"""), 4);
        Assert.Equal(RequestFidelity.Fast, chat.Fidelity);
        Assert.Equal(8, chat.PromptTokens);   // 4 bytes of "user" + 28 of content, at 4 bytes a token
        Assert.Equal(3, RequestTraits.FromOpenAiJson("""{"prompt":[1,2,3]}"""u8, 4).PromptTokens);
        Assert.Equal(RequestTraits.Unknown, RequestTraits.FromOpenAiJson("""{"prompt":"#"""u8, 4) with { PromptTokens = 0 });

        var request = Clients.Request(4, "m", 1, 2, 3, 4, 5);
        request.Fidelity = Fidelity.Exact;
        var message = request.ToByteArray();
        var frame = new byte[5 + message.Length];
        System.Buffers.Binary.BinaryPrimitives.WriteUInt32BigEndian(frame.AsSpan(1), (uint)message.Length);
        message.CopyTo(frame, 5);
        Assert.Equal(new RequestTraits("m", 5, RequestFidelity.Exact, null), RequestTraits.FromGrpcFrame(frame, 4));
        frame[0] = 1;   // compressed: not inspected
        Assert.Equal(RequestTraits.Unknown, RequestTraits.FromGrpcFrame(frame, 4));
    }

    private string? Pick(RequestTraits traits)
    {
        var context = new DefaultHttpContext();
        context.Features.Set(traits);
        return _policy.PickDestination(context, new ClusterState("c"), _destinations)?.DestinationId;
    }

    private void Publish(string id, int running, int[] dsla, long kvUsed, bool draining = false) =>
        _fleet.UpdateMetrics(new ServiceMetricsRecord(id, _time.GetUtcNow().AddTicks(++_published), 0, running, new Dictionary<string, int>(), 0, kvUsed, 100,
            0, 0, 0, 0, dsla, 4, 1, draining));

    private static ServiceRegistration Registration(string id, string model) =>
        new(id, $"http://{id}", $"http://{id}:1", model, 4, [3, 2, 1, 0], "dsla-foldable", 4096, 32, 64, 100, DateTimeOffset.UnixEpoch);
}

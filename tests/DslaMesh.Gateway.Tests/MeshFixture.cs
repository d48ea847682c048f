using DslaMesh.Tests.Common;

namespace DslaMesh.Gateway.Tests;

/// <summary>A real Redis, two model-service processes registered in it, and a gateway in front of them.</summary>
public sealed class MeshFixture : IAsyncLifetime
{
    public RedisServer Redis { get; private set; } = null!;
    public ModelServiceProcess A { get; private set; } = null!;
    public ModelServiceProcess B { get; private set; } = null!;
    public GatewayHost Gateway { get; private set; } = null!;
    public string Prefix { get; } = "mesh";

    public async ValueTask InitializeAsync()
    {
        Redis = await RedisServer.StartAsync();
        var a = ModelServiceProcess.StartAsync("replica-a", Redis.Configuration, Prefix);
        var b = ModelServiceProcess.StartAsync("replica-b", Redis.Configuration, Prefix);
        A = await a;
        B = await b;
        Gateway = await GatewayHost.StartAsync(Redis.Configuration, Prefix);
        await Gateway.WaitForReplicasAsync([A.Id, B.Id], CancellationToken.None);
    }

    public async ValueTask DisposeAsync()
    {
        await Gateway.DisposeAsync();
        await A.DisposeAsync();
        await B.DisposeAsync();
        await Redis.DisposeAsync();
    }
}

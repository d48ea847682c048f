using Microsoft.Extensions.Options;
using StackExchange.Redis;

namespace DslaMesh.Controller.Hosting;

/// <summary>
/// The controller's one Redis multiplexer. It connects in the background and reconnects by itself; while Redis is down
/// commands fail within <see cref="RedisOptions.CommandTimeout"/> and callers hold their state.
/// </summary>
public sealed class RedisConnection : IAsyncDisposable
{
    private readonly Lazy<Task<ConnectionMultiplexer>> _connection;

    public RedisConnection(IOptions<RedisOptions> options)
    {
        var redis = options.Value;
        Prefix = redis.Prefix;
        _connection = new(() =>
        {
            var configuration = ConfigurationOptions.Parse(redis.Configuration);
            configuration.AbortOnConnectFail = false;
            configuration.ConnectRetry = int.MaxValue;
            configuration.AsyncTimeout = (int)redis.CommandTimeout.TotalMilliseconds;
            configuration.SyncTimeout = (int)redis.CommandTimeout.TotalMilliseconds;
            configuration.ConnectTimeout = (int)Math.Max(redis.CommandTimeout.TotalMilliseconds, 1000);
            configuration.ReconnectRetryPolicy = new LinearRetry(500);
            return ConnectionMultiplexer.ConnectAsync(configuration);
        });
    }

    /// <summary>The fleet's key prefix.</summary>
    public string Prefix { get; }

    /// <summary>Whether the multiplexer is connected now.</summary>
    public bool IsConnected => _connection.IsValueCreated && _connection.Value.IsCompletedSuccessfully && _connection.Value.Result.IsConnected;

    /// <summary>The database, once the multiplexer exists (it may still be disconnected).</summary>
    public async Task<IDatabase> GetDatabaseAsync() => (await _connection.Value.ConfigureAwait(false)).GetDatabase();

    /// <inheritdoc/>
    public async ValueTask DisposeAsync()
    {
        if (_connection.IsValueCreated && _connection.Value.IsCompletedSuccessfully)
        {
            await _connection.Value.Result.DisposeAsync().ConfigureAwait(false);
        }
    }
}

using System.Text.Json;
using System.Threading.Channels;
using DslaMesh.Fleet;
using DslaMesh.Gateway.Hosting;
using Microsoft.Extensions.Options;
using StackExchange.Redis;

namespace DslaMesh.Gateway.Discovery;

/// <summary>
/// Keeps <see cref="FleetView"/> and the proxy configuration in step with Redis: re-reads the registry
/// (<c>{prefix}:services</c> and each <c>{prefix}:service:{id}</c>) every poll interval and at once when a metrics message
/// names an unknown replica, and takes metrics from the <c>{prefix}:metrics</c> channel as they are published. While
/// Redis is down the gateway keeps routing to the replicas it knew, and health checks keep judging them.
/// </summary>
public sealed partial class FleetDiscovery : BackgroundService
{
    private readonly FleetView _view;
    private readonly FleetProxyConfigProvider _config;
    private readonly RedisOptions _redis;
    private readonly TimeProvider _time;
    private readonly ILogger<FleetDiscovery> _logger;
    private readonly Channel<bool> _wake = Channel.CreateBounded<bool>(new BoundedChannelOptions(1) { FullMode = BoundedChannelFullMode.DropWrite });
    private readonly TaskCompletionSource _firstRefresh = new(TaskCreationOptions.RunContinuationsAsynchronously);
    private ConnectionMultiplexer? _connection;
    private bool _failing;

    public FleetDiscovery(FleetView view, FleetProxyConfigProvider config, IOptions<RedisOptions> redis, TimeProvider time, ILogger<FleetDiscovery> logger)
    {
        _view = view;
        _config = config;
        _redis = redis.Value;
        _time = time;
        _logger = logger;
    }

    /// <summary>Completes after the first successful read of the registry.</summary>
    public Task FirstRefresh => _firstRefresh.Task;

    /// <summary>Asks for a registry read now (coalesced with one already pending).</summary>
    public void RequestRefresh() => _wake.Writer.TryWrite(true);

    /// <inheritdoc/>
    protected override async Task ExecuteAsync(CancellationToken stoppingToken)
    {
        var options = ConfigurationOptions.Parse(_redis.Configuration);
        options.AbortOnConnectFail = false;
        options.ConnectRetry = int.MaxValue;
        _connection = await ConnectionMultiplexer.ConnectAsync(options).ConfigureAwait(false);
        var channel = RedisChannel.Literal(FleetKeys.MetricsChannel(_redis.Prefix));
        await _connection.GetSubscriber().SubscribeAsync(channel, (_, message) => OnMetrics(message)).ConfigureAwait(false);

        _ = TickAsync(stoppingToken);
        RequestRefresh();
        await foreach (var _ in _wake.Reader.ReadAllAsync(stoppingToken).ConfigureAwait(false))
        {
            await RefreshAsync().ConfigureAwait(false);
        }
    }

    private async Task TickAsync(CancellationToken stoppingToken)
    {
        using var timer = new PeriodicTimer(_redis.PollInterval, _time);
        try
        {
            while (await timer.WaitForNextTickAsync(stoppingToken).ConfigureAwait(false))
            {
                RequestRefresh();
            }
        }
        catch (OperationCanceledException)
        {
            // Stopping.
        }
    }

    private void OnMetrics(RedisValue message)
    {
        ServiceMetricsRecord? metrics;
        try
        {
            metrics = JsonSerializer.Deserialize((string)message!, FleetJsonContext.Default.ServiceMetricsRecord);
        }
        catch (JsonException e)
        {
            Log.BadRecord(_logger, "metrics message", e.Message);
            return;
        }
        if (metrics is not null && _view.UpdateMetrics(metrics))
        {
            RequestRefresh();
        }
    }

    private async Task RefreshAsync()
    {
        if (_connection is null)
        {
            return;
        }
        try
        {
            var db = _connection.GetDatabase();
            var ids = (await db.SetMembersAsync(FleetKeys.Services(_redis.Prefix)).ConfigureAwait(false)).Select(v => v.ToString()).ToArray();
            var registrations = ids.Length == 0 ? [] : await db.StringGetAsync([.. ids.Select(id => (RedisKey)FleetKeys.Service(_redis.Prefix, id))]).ConfigureAwait(false);
            var metrics = ids.Length == 0 ? [] : await db.StringGetAsync([.. ids.Select(id => (RedisKey)FleetKeys.Metrics(_redis.Prefix, id))]).ConfigureAwait(false);
            var replicas = new Dictionary<string, ServiceRegistration>(StringComparer.Ordinal);
            for (var i = 0; i < ids.Length; i++)
            {
                // A key that expired (its replica stopped heartbeating) leaves a stale set member behind: skip it.
                if (Parse(registrations[i], FleetJsonContext.Default.ServiceRegistration, "registration") is { } registration && registration.Id == ids[i])
                {
                    replicas[registration.Id] = registration;
                }
                if (Parse(metrics[i], FleetJsonContext.Default.ServiceMetricsRecord, "metrics") is { } record)
                {
                    _view.UpdateMetrics(record);
                }
            }
            if (_view.SetReplicas(replicas))
            {
                _config.Update(replicas.Values);
                Log.FleetChanged(_logger, replicas.Count, string.Join(", ", replicas.Keys.Order(StringComparer.Ordinal)));
            }
            if (_failing)
            {
                _failing = false;
                Log.Recovered(_logger);
            }
            _firstRefresh.TrySetResult();
        }
        catch (Exception e) when (e is RedisException or TimeoutException)
        {
            _view.RegistryUnavailable = true;
            if (!_failing)
            {
                _failing = true;
                Log.RegistryUnavailable(_logger, e.Message);
            }
        }
    }

    private T? Parse<T>(RedisValue value, System.Text.Json.Serialization.Metadata.JsonTypeInfo<T> type, string what) where T : class
    {
        if (value.IsNullOrEmpty)
        {
            return null;
        }
        try
        {
            return JsonSerializer.Deserialize((string)value!, type);
        }
        catch (JsonException e)
        {
            Log.BadRecord(_logger, what, e.Message);
            return null;
        }
    }

    /// <inheritdoc/>
    public override void Dispose()
    {
        _connection?.Dispose();
        base.Dispose();
    }

    private static partial class Log
    {
        [LoggerMessage(100, LogLevel.Information, "Fleet changed: {Count} replica(s): {Replicas}", EventName = "FleetChanged")]
        public static partial void FleetChanged(ILogger logger, int count, string replicas);

        [LoggerMessage(101, LogLevel.Warning, "Redis registry unavailable; routing to the replicas known so far: {Reason}", EventName = "RegistryUnavailable")]
        public static partial void RegistryUnavailable(ILogger logger, string reason);

        [LoggerMessage(102, LogLevel.Information, "Redis registry reachable again", EventName = "RegistryRecovered")]
        public static partial void Recovered(ILogger logger);

        [LoggerMessage(103, LogLevel.Warning, "Ignoring a malformed {What} record: {Reason}", EventName = "BadFleetRecord")]
        public static partial void BadRecord(ILogger logger, string what, string reason);
    }
}

using System.Text.Json;
using DslaMesh.Fleet;
using DslaMesh.ModelService.Hosting;
using DslaMesh.ModelService.Metrics;
using Microsoft.Extensions.Options;
using StackExchange.Redis;

namespace DslaMesh.ModelService.Registry;

/// <summary>
/// Registers this service in Redis once the model is ready, refreshes the registration (TTL heartbeat) and publishes
/// metrics every period, and deregisters on shutdown. If Redis is down the service keeps serving; the multiplexer
/// reconnects by itself and publishing resumes.
/// </summary>
public sealed partial class RedisPublisher : BackgroundService
{
    private readonly ModelHost _host;
    private readonly ServiceIdentity _identity;
    private readonly ServiceMetrics _metrics;
    private readonly RedisOptions _redis;
    private readonly ModelServiceOptions _service;
    private readonly TimeProvider _time;
    private readonly ILogger<RedisPublisher> _logger;
    private ConnectionMultiplexer? _connection;
    private bool _failing;

    public RedisPublisher(ModelHost host, ServiceIdentity identity, ServiceMetrics metrics, IOptions<RedisOptions> redis, IOptions<ModelServiceOptions> service, TimeProvider time, ILogger<RedisPublisher> logger)
    {
        _host = host;
        _identity = identity;
        _metrics = metrics;
        _redis = redis.Value;
        _service = service.Value;
        _time = time;
        _logger = logger;
    }

    /// <inheritdoc/>
    protected override async Task ExecuteAsync(CancellationToken stoppingToken)
    {
        if (string.IsNullOrWhiteSpace(_redis.Configuration))
        {
            return;
        }
        try
        {
            await _host.Ready.WaitAsync(stoppingToken).ConfigureAwait(false);
        }
        catch (Exception) when (!stoppingToken.IsCancellationRequested)
        {
            return;   // the model failed to load; nothing to register
        }
        var options = ConfigurationOptions.Parse(_redis.Configuration);
        options.AbortOnConnectFail = false;
        options.ConnectRetry = int.MaxValue;
        _connection = await ConnectionMultiplexer.ConnectAsync(options).ConfigureAwait(false);
        var started = _time.GetUtcNow();
        using var timer = new PeriodicTimer(_redis.PublishPeriod, _time);
        do
        {
            await PublishAsync(started).ConfigureAwait(false);
        }
        while (await timer.WaitForNextTickAsync(stoppingToken).ConfigureAwait(false));
    }

    private async Task PublishAsync(DateTimeOffset started)
    {
        if (_host.Engine is not { } engine || _host.Model is not { } model || _connection is null)
        {
            return;
        }
        try
        {
            var db = _connection.GetDatabase();
            var registration = new ServiceRegistration(_identity.Id, _identity.Address, _identity.GrpcAddress, model.Name, model.LayerCount, model.ConversionOrder, model.Variant,
                model.ContextLength, _service.Engine.MaxBatchSize, _service.Engine.MaxQueuedRequests, _service.Engine.KvBudgetBytes, started);
            var snapshot = engine.Snapshot;
            var histogram = snapshot.PromptLengths.GroupBy(FleetKeys.PromptBucket).ToDictionary(g => g.Key, g => g.Count());
            var metrics = new ServiceMetricsRecord(_identity.Id, _time.GetUtcNow(), snapshot.Waiting, snapshot.Running, histogram,
                snapshot.PromptLengths.DefaultIfEmpty(0).Max(), snapshot.KvBytesUsed, snapshot.KvBudgetBytes,
                _metrics.TimeToFirstToken.Quantile(0.5), _metrics.TimeToFirstToken.Quantile(0.99), _metrics.InterTokenLatency.Quantile(0.5), _metrics.InterTokenLatency.Quantile(0.99),
                snapshot.DslaLayers, snapshot.LayerCount, snapshot.Epoch, snapshot.Draining);
            var metricsJson = JsonSerializer.Serialize(metrics, FleetJsonContext.Default.ServiceMetricsRecord);
            var ttl = _redis.RegistrationTtl;
            await Task.WhenAll(
                db.StringSetAsync(FleetKeys.Service(_redis.Prefix, _identity.Id), JsonSerializer.Serialize(registration, FleetJsonContext.Default.ServiceRegistration), ttl),
                db.SetAddAsync(FleetKeys.Services(_redis.Prefix), _identity.Id),
                db.StringSetAsync(FleetKeys.Metrics(_redis.Prefix, _identity.Id), metricsJson, ttl),
                db.PublishAsync(RedisChannel.Literal(FleetKeys.MetricsChannel(_redis.Prefix)), metricsJson)).ConfigureAwait(false);
            if (_failing)
            {
                _failing = false;
                Log.Recovered(_logger);
            }
        }
        catch (Exception e) when (e is RedisException or TimeoutException)
        {
            if (!_failing)
            {
                _failing = true;
                Log.PublishFailed(_logger, e.Message);
            }
        }
    }

    /// <inheritdoc/>
    public override async Task StopAsync(CancellationToken cancellationToken)
    {
        await base.StopAsync(cancellationToken).ConfigureAwait(false);
        if (_connection is { IsConnected: true })
        {
            try
            {
                var db = _connection.GetDatabase();
                await db.KeyDeleteAsync([FleetKeys.Service(_redis.Prefix, _identity.Id), FleetKeys.Metrics(_redis.Prefix, _identity.Id)]).ConfigureAwait(false);
                await db.SetRemoveAsync(FleetKeys.Services(_redis.Prefix), _identity.Id).ConfigureAwait(false);
                Log.Deregistered(_logger, _identity.Id);
            }
            catch (Exception e) when (e is RedisException or TimeoutException)
            {
                Log.PublishFailed(_logger, e.Message);
            }
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
        [LoggerMessage(20, LogLevel.Warning, "Redis unavailable, still serving and retrying: {Reason}", EventName = "RedisPublishFailed")]
        public static partial void PublishFailed(ILogger logger, string reason);

        [LoggerMessage(21, LogLevel.Information, "Redis reachable again; registration and metrics resumed", EventName = "RedisRecovered")]
        public static partial void Recovered(ILogger logger);

        [LoggerMessage(22, LogLevel.Information, "Deregistered {ServiceId} from Redis", EventName = "RedisDeregistered")]
        public static partial void Deregistered(ILogger logger, string serviceId);
    }
}

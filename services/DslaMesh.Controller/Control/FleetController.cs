using System.Text.Json;
using DslaMesh.Controller.Hosting;
using DslaMesh.Controller.Metrics;
using DslaMesh.Controller.Policies;
using DslaMesh.Fleet;
using DslaMesh.Policy;
using DslaMesh.Protos.V1;
using Microsoft.Extensions.Options;
using StackExchange.Redis;

namespace DslaMesh.Controller.Control;

/// <summary>The outcome of a manual conversion.</summary>
public sealed record ConvertOutcome(bool Accepted, string Reason, long Epoch, IReadOnlyList<int> DslaLayers, int LayerCount);

/// <summary>A point-in-time view of one service for the admin API.</summary>
public sealed record ServiceStatusView(
    string Id, ServiceRegistration? Registration, ServiceMetricsRecord? Metrics, IReadOnlyList<int> DslaLayers, IReadOnlyList<int> Desired,
    long Epoch, long DesiredEpoch, bool Connected, int CapLayers, string LastDecision, int LayerCount);

/// <summary>The controller was asked to act while another controller holds the lease.</summary>
public sealed class NotLeaderException(string message) : Exception(message);

/// <summary>
/// The control loop. Every tick (default 250 ms) it renews the leader lease, reads the policy, the registry and every
/// service's metrics from Redis, keeps one control stream per service, runs <see cref="DecisionEngine"/> and sends each
/// service whose desired layers changed a command with a new epoch. If Redis is unreachable the tick is skipped: the
/// streams stay up and every service keeps its layers.
/// </summary>
public sealed partial class FleetController : BackgroundService, IControlStreamOwner
{
    private readonly RedisConnection _redis;
    private readonly EpochFence _fence;
    private readonly PolicyStore _policies;
    private readonly ControllerOptions _options;
    private readonly TimeProvider _time;
    private readonly ILogger<FleetController> _logger;
    private readonly ILoggerFactory _loggers;
    private readonly ControllerMetrics _metrics;
    private readonly Lock _gate = new();
    private readonly Dictionary<string, TrackedService> _services = new(StringComparer.Ordinal);
    private readonly SemaphoreSlim _issue = new(1, 1);
    private readonly SemaphoreSlim _wake = new(0, 1);
    private bool _redisDown;
    private bool _wasLeader;

    public FleetController(RedisConnection redis, EpochFence fence, PolicyStore policies, IOptions<ControllerOptions> options, TimeProvider time, ILoggerFactory loggers, ControllerMetrics metrics)
    {
        _metrics = metrics;
        _redis = redis;
        _fence = fence;
        _policies = policies;
        _options = options.Value;
        _time = time;
        _loggers = loggers;
        _logger = loggers.CreateLogger<FleetController>();
    }

    /// <summary>Whether the last tick reached Redis.</summary>
    public bool RedisHealthy => !_redisDown;

    /// <summary>Whether this controller holds the leader lease.</summary>
    public bool IsLeader => _fence.IsLeader;

    /// <summary>This controller's id.</summary>
    public string Id => _fence.Id;

    /// <summary>Runs a tick now (after a policy change) instead of at the next period.</summary>
    public void Wake()
    {
        try
        {
            _wake.Release();
        }
        catch (SemaphoreFullException)
        {
            // A wake-up is already pending.
        }
    }

    /// <summary>Every known service.</summary>
    public IReadOnlyList<ServiceStatusView> Snapshot()
    {
        lock (_gate)
        {
            return _services.Values.OrderBy(s => s.Id, StringComparer.Ordinal).Select(s => new ServiceStatusView(
                s.Id, s.Registration, s.Metrics,
                s.Observed?.DslaLayers.ToList() ?? s.Metrics?.DslaLayers ?? [],
                s.Desired, s.Observed?.Epoch ?? s.Metrics?.Epoch ?? 0, s.IssuedEpoch, s.Connection?.IsConnected == true, s.CapLayers, s.LastDecision, s.LayerCount)).ToList();
        }
    }

    /// <summary>Converts (or reverts) layers of one service now with a new epoch and pins them against the policy for a while.</summary>
    /// <exception cref="KeyNotFoundException">Unknown service.</exception>
    /// <exception cref="ArgumentException">Layers outside the model.</exception>
    /// <exception cref="NotLeaderException">Another controller holds the lease.</exception>
    public async Task<ConvertOutcome> ConvertAsync(string serviceId, IReadOnlyList<int> layers, bool toDsla, TimeSpan? hold, CancellationToken cancellationToken)
    {
        await _issue.WaitAsync(cancellationToken).ConfigureAwait(false);
        long epoch;
        ServiceConnection connection;
        try
        {
            TrackedService entry;
            lock (_gate)
            {
                entry = _services.GetValueOrDefault(serviceId) ?? throw new KeyNotFoundException($"no model service '{serviceId}' is registered (known: {string.Join(", ", _services.Keys)})");
            }
            var count = entry.LayerCount;
            if (layers.Count == 0 || layers.Any(l => l < 0 || l >= count))
            {
                throw new ArgumentException(layers.Count == 0 ? "give at least one layer" : $"layers {string.Join(",", layers.Where(l => l < 0 || l >= count))} do not exist (the model has {count})");
            }
            if (!_fence.IsLeader)
            {
                throw new NotLeaderException($"this controller ({_fence.Id}) is not the leader; the leader is {await _fence.LeaderAsync().ConfigureAwait(false) ?? "nobody yet"}");
            }
            var until = _time.GetUtcNow() + (hold is { } h && h > TimeSpan.Zero ? h : _options.DefaultPinDuration);
            lock (_gate)
            {
                var pins = entry.State.Pins.Where(p => !layers.Contains(p.Layer)).Concat(layers.Distinct().Select(l => new LayerPin(l, toDsla, until))).ToList();
                entry.State = entry.State with { Pins = pins };
                entry.Desired = entry.State.DesiredLayers();
                entry.LastDecision = $"manual: layers {string.Join(",", layers)} pinned to {(toDsla ? "DSLA" : "attention")} until {until:O}";
                connection = entry.Connection ?? throw new InvalidOperationException($"no control stream to {serviceId}");
            }
            epoch = await IssueAsync(entry).ConfigureAwait(false) ?? throw new NotLeaderException($"this controller ({_fence.Id}) lost the leader lease");
            await PersistAsync(entry).ConfigureAwait(false);
            Log.ManualConvert(_logger, serviceId, string.Join(",", layers), toDsla ? "DSLA" : "attention", epoch);
        }
        finally
        {
            _issue.Release();
        }
        using var timeout = CancellationTokenSource.CreateLinkedTokenSource(cancellationToken);
        timeout.CancelAfter(_options.CommandTimeout);
        try
        {
            var state = await connection.WaitForAsync(epoch, timeout.Token).ConfigureAwait(false);
            return new ConvertOutcome(state.Accepted, state.Accepted ? "" : state.Reason, state.Epoch, [.. state.DslaLayers], state.LayerCount);
        }
        catch (OperationCanceledException) when (!cancellationToken.IsCancellationRequested)
        {
            throw new TimeoutException($"{serviceId} did not answer epoch {epoch} within {_options.CommandTimeout.TotalSeconds:F0} s; the controller keeps re-sending it");
        }
    }

    /// <inheritdoc/>
    protected override async Task ExecuteAsync(CancellationToken stoppingToken)
    {
        using var timer = new PeriodicTimer(_options.TickPeriod, _time);
        Task<bool>? tick = null;
        Task? wake = null;
        while (!stoppingToken.IsCancellationRequested)
        {
            try
            {
                await TickAsync(stoppingToken).ConfigureAwait(false);
            }
            catch (OperationCanceledException) when (stoppingToken.IsCancellationRequested)
            {
                break;
            }
            catch (Exception e)
            {
                Log.TickFailed(_logger, e);
            }
            tick ??= timer.WaitForNextTickAsync(stoppingToken).AsTask();
            wake ??= _wake.WaitAsync(stoppingToken);
            var done = await Task.WhenAny(tick, wake).ConfigureAwait(false);
            if (done.IsCanceled)
            {
                break;
            }
            if (done == tick)
            {
                tick = null;
            }
            else
            {
                wake = null;
            }
        }
    }

    /// <inheritdoc/>
    public override async Task StopAsync(CancellationToken cancellationToken)
    {
        await base.StopAsync(cancellationToken).ConfigureAwait(false);
        List<ServiceConnection> connections;
        lock (_gate)
        {
            connections = _services.Values.Select(s => s.Connection).OfType<ServiceConnection>().ToList();
            foreach (var service in _services.Values)
            {
                service.Connection = null;
            }
        }
        foreach (var connection in connections)
        {
            await connection.DisposeAsync().ConfigureAwait(false);
        }
        try
        {
            await _fence.ReleaseAsync().ConfigureAwait(false);
        }
        catch (Exception e) when (e is RedisException or TimeoutException)
        {
            // The lease expires by itself.
        }
    }

    /// <inheritdoc/>
    public override void Dispose()
    {
        _issue.Dispose();
        _wake.Dispose();
        base.Dispose();
    }

    private async Task TickAsync(CancellationToken cancellationToken)
    {
        await _issue.WaitAsync(cancellationToken).ConfigureAwait(false);
        try
        {
            bool leader;
            Dictionary<string, (ServiceRegistration Registration, ServiceMetricsRecord? Metrics)> fleet;
            try
            {
                leader = await _fence.RenewAsync().ConfigureAwait(false);
                await _policies.RefreshAsync().ConfigureAwait(false);
                fleet = await ReadFleetAsync().ConfigureAwait(false);
                if (_redisDown)
                {
                    _redisDown = false;
                    Log.RedisBack(_logger);
                }
            }
            catch (Exception e) when (e is RedisException or TimeoutException)
            {
                if (!_redisDown)
                {
                    _redisDown = true;
                    Log.RedisDown(_logger, e.Message);
                }
                return;
            }
            if (leader != _wasLeader)
            {
                _wasLeader = leader;
                Log.Leadership(_logger, _fence.Id, leader);
                if (leader)
                {
                    lock (_gate)
                    {
                        foreach (var service in _services.Values)
                        {
                            service.NeedsResync = true;
                        }
                    }
                }
            }
            var now = _time.GetUtcNow();
            var removed = Track(fleet, now);
            foreach (var connection in removed)
            {
                await connection.DisposeAsync().ConfigureAwait(false);
            }
            if (!leader)
            {
                return;
            }
            await LoadStatesAsync().ConfigureAwait(false);
            await DecideAsync(now).ConfigureAwait(false);
        }
        finally
        {
            _issue.Release();
        }
    }

    private async Task<Dictionary<string, (ServiceRegistration, ServiceMetricsRecord?)>> ReadFleetAsync()
    {
        var db = await _redis.GetDatabaseAsync().ConfigureAwait(false);
        var prefix = _redis.Prefix;
        var ids = (await db.SetMembersAsync(FleetKeys.Services(prefix)).ConfigureAwait(false)).Select(v => (string)v!).ToList();
        var fleet = new Dictionary<string, (ServiceRegistration, ServiceMetricsRecord?)>(StringComparer.Ordinal);
        if (ids.Count == 0)
        {
            return fleet;
        }
        var registrations = await db.StringGetAsync(ids.Select(id => (RedisKey)FleetKeys.Service(prefix, id)).ToArray()).ConfigureAwait(false);
        var metrics = await db.StringGetAsync(ids.Select(id => (RedisKey)FleetKeys.Metrics(prefix, id)).ToArray()).ConfigureAwait(false);
        for (var i = 0; i < ids.Count; i++)
        {
            if (Parse(registrations[i], FleetJsonContext.Default.ServiceRegistration) is { } registration && registration.Id == ids[i] && registration.LayerCount > 0)
            {
                fleet[ids[i]] = (registration, Parse(metrics[i], FleetJsonContext.Default.ServiceMetricsRecord));
            }
        }
        return fleet;
    }

    private List<ServiceConnection> Track(Dictionary<string, (ServiceRegistration Registration, ServiceMetricsRecord? Metrics)> fleet, DateTimeOffset now)
    {
        var removed = new List<ServiceConnection>();
        lock (_gate)
        {
            foreach (var (id, (registration, metrics)) in fleet)
            {
                if (!_services.TryGetValue(id, out var entry))
                {
                    entry = new TrackedService(id);
                    _services[id] = entry;
                    Log.Discovered(_logger, id, registration.GrpcAddress, registration.LayerCount);
                }
                entry.Registration = registration;
                entry.LastRegistered = now;
                if (metrics is not null)
                {
                    entry.Metrics = metrics;
                }
                if (Uri.TryCreate(registration.GrpcAddress, UriKind.Absolute, out var address) && entry.Connection?.Address != address)
                {
                    if (entry.Connection is { } old)
                    {
                        removed.Add(old);
                    }
                    entry.Connection = new ServiceConnection(id, address, this, _options, _time, _loggers.CreateLogger<ServiceConnection>());
                    entry.Connection.Start();
                }
            }
            foreach (var entry in _services.Values.Where(s => !fleet.ContainsKey(s.Id) && now - s.LastRegistered > _options.ServiceGracePeriod).ToList())
            {
                _services.Remove(entry.Id);
                if (entry.Connection is { } connection)
                {
                    removed.Add(connection);
                }
                Log.Forgotten(_logger, entry.Id);
            }
        }
        return removed;
    }

    private async Task LoadStatesAsync()
    {
        List<TrackedService> fresh;
        lock (_gate)
        {
            fresh = _services.Values.Where(s => !s.StateLoaded && s.Registration is not null).ToList();
        }
        if (fresh.Count == 0)
        {
            return;
        }
        var db = await _redis.GetDatabaseAsync().ConfigureAwait(false);
        var stored = await db.StringGetAsync(fresh.Select(s => (RedisKey)ControllerKeys.State(_redis.Prefix, s.Id)).ToArray()).ConfigureAwait(false);
        lock (_gate)
        {
            for (var i = 0; i < fresh.Count; i++)
            {
                var entry = fresh[i];
                var state = Parse(stored[i], PolicyJsonContext.Default.ServiceDecisionState);
                if (state is null)
                {
                    // Nothing persisted (first run, or Redis lost it): start from what the service runs now.
                    var current = entry.Observed?.DslaLayers.ToList() ?? entry.Metrics?.DslaLayers.ToList() ?? [];
                    var order = entry.Registration!.SensitivityOrder;
                    state = ServiceDecisionState.Empty with { PolicyLayers = current.OrderBy(l => order.ToList().IndexOf(l) is var at and >= 0 ? at : int.MaxValue).ToList() };
                }
                entry.State = state;
                entry.Desired = state.DesiredLayers();
                entry.StateLoaded = true;
            }
        }
    }

    private async Task DecideAsync(DateTimeOffset now)
    {
        var policy = _policies.Current.Policy;
        List<TrackedService> entries;
        List<ServiceView> views;
        Dictionary<string, ServiceDecisionState> states;
        lock (_gate)
        {
            entries = _services.Values.Where(s => s.Registration is not null && s.StateLoaded).ToList();
            views = entries.Select(s => new ServiceView(s.Id, s.Registration!.LayerCount, s.Registration.SensitivityOrder, s.Metrics)).ToList();
            states = entries.ToDictionary(s => s.Id, s => s.State, StringComparer.Ordinal);
        }
        var decisions = DecisionEngine.Decide(policy, views, states, now);
        for (var i = 0; i < decisions.Count; i++)
        {
            var decision = decisions[i];
            var entry = entries[i];
            bool send;
            bool persist;
            lock (_gate)
            {
                persist = decision.Action != DecisionAction.Hold || decision.State.Pins.Count != entry.State.Pins.Count;
                entry.State = decision.State;
                entry.LastDecision = decision.Reason;
                entry.CapLayers = decision.CapLayers;
                // Someone else (an operator's own command, another controller) applied a newer epoch with other layers.
                if (entry.Metrics is { } metrics && entry.IssuedEpoch > 0 && metrics.Epoch > entry.IssuedEpoch && !Same(metrics.DslaLayers, decision.DslaLayers))
                {
                    entry.NeedsResync = true;
                }
                entry.Desired = decision.DslaLayers;
                // Compare with what was last issued, not with the previous wish: a change decided while the stream was
                // down, or between a reconnect's re-send and the stream counting as connected, must still go out once
                // the stream is up (it used to be dropped, leaving the service on the re-sent layers for good).
                var unsent = entry.IssuedLayers is not { } issued || !Same(issued, entry.Desired);
                send = (unsent || entry.NeedsResync) && entry.Connection?.IsConnected == true;
            }
            if (decision.Action != DecisionAction.Hold)
            {
                _metrics.OnDecision(decision.Action);
                Log.Decision(_logger, entry.Id, decision.Action, string.Join(",", decision.Changed), string.Join(",", decision.DslaLayers), policy.Version, decision.Reason);
            }
            if (send && await IssueAsync(entry).ConfigureAwait(false) is null)
            {
                return;   // lost the lease
            }
            if (persist)
            {
                await PersistAsync(entry).ConfigureAwait(false);
            }
        }
    }

    /// <summary>Draws a new epoch and queues the desired state on the service's stream; null when not the leader.</summary>
    private async Task<long?> IssueAsync(TrackedService entry)
    {
        long floor;
        lock (_gate)
        {
            floor = entry.EpochFloor;
        }
        var epoch = await _fence.NextEpochAsync(entry.Id, floor).ConfigureAwait(false);
        if (epoch is not { } issued)
        {
            return null;
        }
        ConversionCommand command;
        lock (_gate)
        {
            entry.IssuedEpoch = issued;
            entry.IssuedLayers = entry.Desired;
            entry.NeedsResync = false;
            command = Command(issued, entry.Desired, entry.LayerCount, _fence.Id);
            entry.Connection?.Send(command);
        }
        return issued;
    }

    private async Task PersistAsync(TrackedService entry)
    {
        string json;
        lock (_gate)
        {
            json = JsonSerializer.Serialize(entry.State, PolicyJsonContext.Default.ServiceDecisionState);
        }
        var db = await _redis.GetDatabaseAsync().ConfigureAwait(false);
        await db.StringSetAsync(ControllerKeys.State(_redis.Prefix, entry.Id), json).ConfigureAwait(false);
    }

    /// <inheritdoc/>
    async Task<ConversionCommand?> IControlStreamOwner.OnConnectedAsync(string serviceId, ConversionState state, CancellationToken cancellationToken)
    {
        await _issue.WaitAsync(cancellationToken).ConfigureAwait(false);
        try
        {
            TrackedService? entry;
            lock (_gate)
            {
                entry = _services.GetValueOrDefault(serviceId);
            }
            if (entry is null)
            {
                return null;
            }
            if (_fence.IsLeader && entry.StateLoaded)
            {
                try
                {
                    var floor = Math.Max(entry.EpochFloor, state.Epoch);
                    if (await _fence.NextEpochAsync(serviceId, floor).ConfigureAwait(false) is { } epoch)
                    {
                        lock (_gate)
                        {
                            entry.IssuedEpoch = epoch;
                            entry.IssuedLayers = entry.Desired;
                            entry.NeedsResync = false;
                            Log.Resync(_logger, serviceId, epoch, string.Join(",", entry.Desired));
                            return Command(epoch, entry.Desired, entry.LayerCount, _fence.Id);
                        }
                    }
                }
                catch (Exception e) when (e is RedisException or TimeoutException)
                {
                    // Redis is down: re-send the last command as it was (same epoch, same layers), if there is one.
                }
            }
            lock (_gate)
            {
                return entry.IssuedEpoch > 0 && entry.IssuedLayers is { } layers ? Command(entry.IssuedEpoch, layers, entry.LayerCount, _fence.Id) : null;
            }
        }
        finally
        {
            _issue.Release();
        }
    }

    /// <inheritdoc/>
    void IControlStreamOwner.OnState(string serviceId, ConversionState state)
    {
        lock (_gate)
        {
            if (_services.GetValueOrDefault(serviceId) is not { } entry)
            {
                return;
            }
            entry.Observed = state;
            if (state.CommandEpoch > 0)
            {
                _metrics.OnAnswer(state.Accepted);
            }
            if (state is { Accepted: false, CommandEpoch: > 0 })
            {
                Log.Rejected(_logger, serviceId, state.CommandEpoch, state.Reason);
                // A newer epoch is applied there (a late or foreign command): draw one above it next tick.
                if (state.Epoch > state.CommandEpoch)
                {
                    entry.NeedsResync = true;
                }
            }
        }
    }

    private static ConversionCommand Command(long epoch, IReadOnlyList<int> dsla, int layerCount, string issuer)
    {
        var command = new ConversionCommand { Epoch = epoch, Issuer = issuer };
        var set = dsla.ToHashSet();
        for (var layer = 0; layer < layerCount; layer++)
        {
            command.Layers.Add(new LayerTarget { Layer = layer, Kind = set.Contains(layer) ? LayerKind.Dsla : LayerKind.Attention });
        }
        return command;
    }

    private static bool Same(IEnumerable<int> a, IEnumerable<int> b) => a.Order().SequenceEqual(b.Order());

    private static T? Parse<T>(RedisValue value, System.Text.Json.Serialization.Metadata.JsonTypeInfo<T> type) where T : class
    {
        if (value.IsNullOrEmpty)
        {
            return null;
        }
        try
        {
            return JsonSerializer.Deserialize((string)value!, type);
        }
        catch (JsonException)
        {
            return null;
        }
    }

    private static partial class Log
    {
        [LoggerMessage(50, LogLevel.Information, "Discovered model service {ServiceId} at {Address} ({Layers} layers)", EventName = "ServiceDiscovered")]
        public static partial void Discovered(ILogger logger, string serviceId, string address, int layers);

        [LoggerMessage(51, LogLevel.Information, "Model service {ServiceId} left the registry; control stream closed", EventName = "ServiceForgotten")]
        public static partial void Forgotten(ILogger logger, string serviceId);

        [LoggerMessage(52, LogLevel.Information, "{ServiceId}: {Action} [{Changed}] -> DSLA [{Layers}] (policy v{Version}): {Reason}", EventName = "ConversionDecision")]
        public static partial void Decision(ILogger logger, string serviceId, DecisionAction action, string changed, string layers, long version, string reason);

        [LoggerMessage(53, LogLevel.Warning, "Redis unreachable ({Reason}); holding every service's layers, streams stay up", EventName = "ControllerRedisDown")]
        public static partial void RedisDown(ILogger logger, string reason);

        [LoggerMessage(54, LogLevel.Information, "Redis reachable again; control resumed", EventName = "ControllerRedisBack")]
        public static partial void RedisBack(ILogger logger);

        [LoggerMessage(55, LogLevel.Information, "Controller {ControllerId} leader: {Leader}", EventName = "Leadership")]
        public static partial void Leadership(ILogger logger, string controllerId, bool leader);

        [LoggerMessage(56, LogLevel.Warning, "{ServiceId} rejected epoch {Epoch}: {Reason}", EventName = "CommandRejected")]
        public static partial void Rejected(ILogger logger, string serviceId, long epoch, string reason);

        [LoggerMessage(57, LogLevel.Information, "{ServiceId}: stream (re)connected, re-sent DSLA [{Layers}] at epoch {Epoch}", EventName = "DesiredStateResent")]
        public static partial void Resync(ILogger logger, string serviceId, long epoch, string layers);

        [LoggerMessage(58, LogLevel.Information, "{ServiceId}: manual conversion of layers {Layers} to {Kind} at epoch {Epoch}", EventName = "ManualConvert")]
        public static partial void ManualConvert(ILogger logger, string serviceId, string layers, string kind, long epoch);

        [LoggerMessage(59, LogLevel.Error, "Control tick failed", EventName = "TickFailed")]
        public static partial void TickFailed(ILogger logger, Exception error);
    }
}

using System.Text.Json;
using DslaMesh.Controller.Hosting;
using DslaMesh.Policy;
using Microsoft.Extensions.Options;
using StackExchange.Redis;

namespace DslaMesh.Controller.Policies;

/// <summary>A policy that was refused, with every reason.</summary>
public sealed class PolicyRejectedException(IReadOnlyList<string> errors)
    : Exception("policy rejected: " + string.Join("; ", errors))
{
    /// <summary>Why.</summary>
    public IReadOnlyList<string> Errors { get; } = errors;
}

/// <summary>
/// Versioned policies in Redis: the one in force in <c>{prefix}:policy:current</c>, every version in the list
/// <c>{prefix}:policy:history</c>, version numbers from <c>{prefix}:policy:version</c>. Keeps the last good policy in
/// memory: a malformed value written to Redis by hand is ignored, and a policy lost with Redis is written back.
/// </summary>
public sealed partial class PolicyStore : IDisposable
{
    // KEYS[1] counter; ARGV[1] floor. Next version above both the counter and what this controller has seen.
    private const string VersionScript = """
        local v = tonumber(redis.call('GET', KEYS[1]) or '0')
        local floor = tonumber(ARGV[1])
        if v < floor then v = floor end
        v = v + 1
        redis.call('SET', KEYS[1], v)
        return v
        """;

    private readonly RedisConnection _redis;
    private readonly ControllerOptions _options;
    private readonly TimeProvider _time;
    private readonly ILogger<PolicyStore> _logger;
    private readonly SemaphoreSlim _writeGate = new(1, 1);
    private volatile PolicyHistoryEntry _current;
    private string? _lastSeenJson;

    public PolicyStore(RedisConnection redis, IOptions<ControllerOptions> options, TimeProvider time, ILogger<PolicyStore> logger)
    {
        _redis = redis;
        _options = options.Value;
        _time = time;
        _logger = logger;
        _current = new PolicyHistoryEntry(0, DateTimeOffset.UnixEpoch, "built-in", "default policy", ConversionPolicy.Default);
    }

    /// <summary>The policy in force (the built-in default, version 0, until one is set).</summary>
    public PolicyHistoryEntry Current => _current;

    /// <summary>Reads the current policy from Redis (another controller may have set it) and writes it back if Redis lost it.</summary>
    public async Task RefreshAsync()
    {
        var db = await _redis.GetDatabaseAsync().ConfigureAwait(false);
        var json = (string?)await db.StringGetAsync(ControllerKeys.PolicyCurrent(_redis.Prefix)).ConfigureAwait(false);
        if (json is null)
        {
            if (_current.Version > 0)
            {
                await RestoreAsync(db, _current).ConfigureAwait(false);
            }
            return;
        }
        if (json == _lastSeenJson)
        {
            return;
        }
        _lastSeenJson = json;
        var parsed = PolicyParser.Parse(json);
        if (!parsed.IsValid)
        {
            Log.StoredPolicyInvalid(_logger, string.Join("; ", parsed.Errors), _current.Version);
            return;
        }
        if (parsed.Policy!.Version != _current.Version)
        {
            var entry = (await HistoryAsync().ConfigureAwait(false)).FirstOrDefault(e => e.Version == parsed.Policy.Version)
                ?? new PolicyHistoryEntry(parsed.Policy.Version, _time.GetUtcNow(), "unknown", "", parsed.Policy);
            _current = entry with { Policy = parsed.Policy };
            Log.PolicyLoaded(_logger, parsed.Policy.Version);
        }
    }

    /// <summary>Validates and stores a new version; throws <see cref="PolicyRejectedException"/> and keeps the old one when invalid.</summary>
    public async Task<PolicyHistoryEntry> SetAsync(string json, string setBy, string comment)
    {
        var parsed = PolicyParser.Parse(json);
        if (!parsed.IsValid)
        {
            throw new PolicyRejectedException(parsed.Errors);
        }
        return await StoreAsync(parsed.Policy!, setBy, comment).ConfigureAwait(false);
    }

    /// <summary>Every stored version, newest first.</summary>
    public async Task<IReadOnlyList<PolicyHistoryEntry>> HistoryAsync()
    {
        var db = await _redis.GetDatabaseAsync().ConfigureAwait(false);
        var items = await db.ListRangeAsync(ControllerKeys.PolicyHistory(_redis.Prefix)).ConfigureAwait(false);
        var entries = new List<PolicyHistoryEntry>();
        foreach (var item in items)
        {
            try
            {
                if (JsonSerializer.Deserialize((string)item!, PolicyJsonContext.Default.PolicyHistoryEntry) is { } entry)
                {
                    entries.Add(entry);
                }
            }
            catch (JsonException)
            {
                // A hand-edited entry; skip it rather than fail the whole history.
            }
        }
        entries.Reverse();
        return entries;
    }

    /// <summary>Makes an earlier version current again, as a new version. Without a target: the version before the current one.</summary>
    /// <exception cref="KeyNotFoundException">No such version, or nothing to roll back to.</exception>
    public async Task<PolicyHistoryEntry> RollbackAsync(long? toVersion, string setBy)
    {
        var history = await HistoryAsync().ConfigureAwait(false);   // newest first
        var current = _current.Version;
        PolicyHistoryEntry? target;
        if (toVersion is { } wanted)
        {
            target = history.FirstOrDefault(e => e.Version == wanted)
                ?? (wanted == 0 ? new PolicyHistoryEntry(0, DateTimeOffset.UnixEpoch, "built-in", "default policy", ConversionPolicy.Default) : null)
                ?? throw new KeyNotFoundException($"policy version {wanted} is not in the history (versions: {string.Join(", ", history.Select(e => e.Version))})");
        }
        else
        {
            var index = history.ToList().FindIndex(e => e.Version == current);
            target = index >= 0 && index + 1 < history.Count ? history[index + 1] : null;
            if (target is null)
            {
                throw new KeyNotFoundException(current == 0 ? "no policy has been set; nothing to roll back" : $"version {current} has no earlier version to roll back to");
            }
        }
        return await StoreAsync(target.Policy, setBy, $"rollback to version {target.Version}").ConfigureAwait(false);
    }

    private async Task<PolicyHistoryEntry> StoreAsync(ConversionPolicy policy, string setBy, string comment)
    {
        await _writeGate.WaitAsync().ConfigureAwait(false);
        try
        {
            var db = await _redis.GetDatabaseAsync().ConfigureAwait(false);
            var version = (long)await db.ScriptEvaluateAsync(VersionScript, [ControllerKeys.PolicyVersion(_redis.Prefix)], [_current.Version]).ConfigureAwait(false);
            var stored = policy with { Version = version };
            var entry = new PolicyHistoryEntry(version, _time.GetUtcNow(), setBy, comment, stored);
            var json = PolicyParser.Serialize(stored);
            var transaction = db.CreateTransaction();
            _ = transaction.StringSetAsync(ControllerKeys.PolicyCurrent(_redis.Prefix), json);
            _ = transaction.ListRightPushAsync(ControllerKeys.PolicyHistory(_redis.Prefix), JsonSerializer.Serialize(entry, PolicyJsonContext.Default.PolicyHistoryEntry));
            _ = transaction.ListTrimAsync(ControllerKeys.PolicyHistory(_redis.Prefix), -_options.HistoryLimit, -1);
            await transaction.ExecuteAsync().ConfigureAwait(false);
            _current = entry;
            _lastSeenJson = json;
            Log.PolicySet(_logger, version, setBy, comment);
            return entry;
        }
        finally
        {
            _writeGate.Release();
        }
    }

    private async Task RestoreAsync(IDatabase db, PolicyHistoryEntry entry)
    {
        var json = PolicyParser.Serialize(entry.Policy);
        if (await db.StringSetAsync(ControllerKeys.PolicyCurrent(_redis.Prefix), json, when: When.NotExists).ConfigureAwait(false))
        {
            await db.ScriptEvaluateAsync(VersionScript, [ControllerKeys.PolicyVersion(_redis.Prefix)], [entry.Version - 1]).ConfigureAwait(false);
            if (await db.ListLengthAsync(ControllerKeys.PolicyHistory(_redis.Prefix)).ConfigureAwait(false) == 0)
            {
                await db.ListRightPushAsync(ControllerKeys.PolicyHistory(_redis.Prefix), JsonSerializer.Serialize(entry, PolicyJsonContext.Default.PolicyHistoryEntry)).ConfigureAwait(false);
            }
            _lastSeenJson = json;
            Log.PolicyRestored(_logger, entry.Version);
        }
    }

    /// <inheritdoc/>
    public void Dispose() => _writeGate.Dispose();

    private static partial class Log
    {
        [LoggerMessage(30, LogLevel.Information, "Policy version {Version} set by {SetBy}: {Comment}", EventName = "PolicySet")]
        public static partial void PolicySet(ILogger logger, long version, string setBy, string comment);

        [LoggerMessage(31, LogLevel.Information, "Policy version {Version} loaded from Redis", EventName = "PolicyLoaded")]
        public static partial void PolicyLoaded(ILogger logger, long version);

        [LoggerMessage(32, LogLevel.Warning, "The policy stored in Redis is invalid ({Errors}); keeping version {Version}", EventName = "StoredPolicyInvalid")]
        public static partial void StoredPolicyInvalid(ILogger logger, string errors, long version);

        [LoggerMessage(33, LogLevel.Warning, "Redis lost the policy; wrote version {Version} back", EventName = "PolicyRestored")]
        public static partial void PolicyRestored(ILogger logger, long version);
    }
}

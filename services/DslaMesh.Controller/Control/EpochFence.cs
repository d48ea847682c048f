using DslaMesh.Controller.Hosting;
using Microsoft.Extensions.Options;

namespace DslaMesh.Controller.Control;

/// <summary>
/// Leadership and epochs, both in Redis. One controller holds the leader lease and only it can draw a new epoch for a
/// service; epochs come from a per-service counter that only moves up and is lifted above anything a service already
/// applied (so a controller restarted, or Redis restarted empty, still continues above the last epoch). A stale
/// controller cannot draw epochs, and an old command that arrives late carries an epoch the service already passed.
/// </summary>
public sealed class EpochFence
{
    // KEYS[1] lease; ARGV[1] id, ARGV[2] ttl ms. Renew ours or take a free lease.
    private const string LeaseScript = """
        local holder = redis.call('GET', KEYS[1])
        if holder == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end
        if not holder then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 1 end
        return 0
        """;

    // KEYS[1] lease, KEYS[2] counter; ARGV[1] id, ARGV[2] floor. -1 when not the leader.
    private const string EpochScript = """
        if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
        local epoch = tonumber(redis.call('GET', KEYS[2]) or '0')
        local floor = tonumber(ARGV[2])
        if epoch < floor then epoch = floor end
        epoch = epoch + 1
        redis.call('SET', KEYS[2], epoch)
        return epoch
        """;

    private const string ReleaseScript = """
        if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
        return 0
        """;

    private readonly RedisConnection _redis;
    private readonly ControllerOptions _options;

    public EpochFence(RedisConnection redis, IOptions<ControllerOptions> options)
    {
        _redis = redis;
        _options = options.Value;
        Id = _options.Id ?? $"{Environment.MachineName}-{Environment.ProcessId}-{Guid.NewGuid().ToString("N")[..6]}".ToLowerInvariant();
    }

    /// <summary>This controller's id.</summary>
    public string Id { get; }

    /// <summary>Whether the last renewal found this controller the leader.</summary>
    public bool IsLeader { get; private set; }

    /// <summary>Takes or renews the lease.</summary>
    public async Task<bool> RenewAsync()
    {
        try
        {
            var db = await _redis.GetDatabaseAsync().ConfigureAwait(false);
            var result = await db.ScriptEvaluateAsync(LeaseScript, [ControllerKeys.Leader(_redis.Prefix)], [Id, (long)_options.LeaseTtl.TotalMilliseconds]).ConfigureAwait(false);
            IsLeader = (long)result == 1;
            return IsLeader;
        }
        catch
        {
            IsLeader = false;
            throw;
        }
    }

    /// <summary>The current lease holder, if any.</summary>
    public async Task<string?> LeaderAsync()
    {
        var db = await _redis.GetDatabaseAsync().ConfigureAwait(false);
        return await db.StringGetAsync(ControllerKeys.Leader(_redis.Prefix)).ConfigureAwait(false);
    }

    /// <summary>A new epoch for a service above <paramref name="floor"/>, or null when this controller is not the leader.</summary>
    public async Task<long?> NextEpochAsync(string serviceId, long floor)
    {
        var db = await _redis.GetDatabaseAsync().ConfigureAwait(false);
        var result = (long)await db.ScriptEvaluateAsync(EpochScript, [ControllerKeys.Leader(_redis.Prefix), ControllerKeys.Epoch(_redis.Prefix, serviceId)], [Id, floor]).ConfigureAwait(false);
        if (result < 0)
        {
            IsLeader = false;
            return null;
        }
        return result;
    }

    /// <summary>Gives the lease up (on shutdown), so another controller takes over without waiting for the TTL.</summary>
    public async Task ReleaseAsync()
    {
        if (!_redis.IsConnected)
        {
            return;
        }
        var db = await _redis.GetDatabaseAsync().ConfigureAwait(false);
        await db.ScriptEvaluateAsync(ReleaseScript, [ControllerKeys.Leader(_redis.Prefix)], [Id]).ConfigureAwait(false);
        IsLeader = false;
    }
}

using System.Diagnostics.CodeAnalysis;
using DslaMesh.Controller.Control;
using DslaMesh.Controller.Policies;
using DslaMesh.Policy;
using DslaMesh.Protos.V1;
using Google.Protobuf.WellKnownTypes;
using Grpc.Core;
using StackExchange.Redis;

namespace DslaMesh.Controller.Admin;

/// <summary>The controller's admin API: policy get/set/validate/history/rollback, fleet status and manual conversion.</summary>
public sealed class AdminGrpcService : ControllerAdmin.ControllerAdminBase
{
    private readonly PolicyStore _policies;
    private readonly FleetController _fleet;

    public AdminGrpcService(PolicyStore policies, FleetController fleet)
    {
        _policies = policies;
        _fleet = fleet;
    }

    /// <inheritdoc/>
    public override Task<PolicyReply> GetPolicy(GetPolicyRequest request, ServerCallContext context) => Task.FromResult(Reply(_policies.Current));

    /// <inheritdoc/>
    public override async Task<PolicyReply> SetPolicy(SetPolicyRequest request, ServerCallContext context)
    {
        ArgumentNullException.ThrowIfNull(request);
        var entry = await Guard(() => _policies.SetAsync(request.PolicyJson, Who(request.SetBy, context), request.Comment)).ConfigureAwait(false);
        _fleet.Wake();
        return Reply(entry);
    }

    /// <inheritdoc/>
    public override Task<ValidatePolicyReply> ValidatePolicy(ValidatePolicyRequest request, ServerCallContext context)
    {
        ArgumentNullException.ThrowIfNull(request);
        var parsed = PolicyParser.Parse(request.PolicyJson);
        var reply = new ValidatePolicyReply { Valid = parsed.IsValid, NormalizedJson = parsed.IsValid ? PolicyParser.Serialize(parsed.Policy!) : "" };
        reply.Errors.Add(parsed.Errors);
        return Task.FromResult(reply);
    }

    /// <inheritdoc/>
    public override async Task<PolicyHistoryReply> GetPolicyHistory(GetPolicyHistoryRequest request, ServerCallContext context)
    {
        ArgumentNullException.ThrowIfNull(request);
        var history = await Guard(_policies.HistoryAsync).ConfigureAwait(false);
        var reply = new PolicyHistoryReply { CurrentVersion = _policies.Current.Version };
        reply.Versions.Add((request.Limit > 0 ? history.Take(request.Limit) : history).Select(Reply));
        return reply;
    }

    /// <inheritdoc/>
    public override async Task<PolicyReply> RollbackPolicy(RollbackPolicyRequest request, ServerCallContext context)
    {
        ArgumentNullException.ThrowIfNull(request);
        var entry = await Guard(() => _policies.RollbackAsync(request.HasToVersion ? request.ToVersion : null, Who(request.SetBy, context))).ConfigureAwait(false);
        _fleet.Wake();
        return Reply(entry);
    }

    /// <inheritdoc/>
    public override Task<StatusReply> GetStatus(GetStatusRequest request, ServerCallContext context)
    {
        var reply = new StatusReply { PolicyVersion = _policies.Current.Version, ControllerId = _fleet.Id, Leader = _fleet.IsLeader, RedisConnected = _fleet.RedisHealthy };
        foreach (var view in _fleet.Snapshot())
        {
            var status = new ServiceStatus
            {
                Id = view.Id,
                Address = view.Registration?.Address ?? "",
                GrpcAddress = view.Registration?.GrpcAddress ?? "",
                Model = view.Registration?.Model ?? "",
                LayerCount = view.LayerCount,
                Epoch = view.Epoch,
                DesiredEpoch = view.DesiredEpoch,
                Connected = view.Connected,
                CapLayers = view.CapLayers,
                LastDecision = view.LastDecision,
            };
            status.DslaLayers.Add(view.DslaLayers);
            status.DesiredDslaLayers.Add(view.Desired);
            if (view.Registration is { } registration)
            {
                status.SensitivityOrder.Add(registration.SensitivityOrder);
            }
            if (view.Metrics is { } m)
            {
                status.QueueDepth = m.QueueDepth;
                status.Running = m.Running;
                status.KvUsedBytes = m.KvUsedBytes;
                status.KvTotalBytes = m.KvTotalBytes;
                status.TtftP50 = Finite(m.TtftP50);
                status.TtftP99 = Finite(m.TtftP99);
                status.ItlP50 = Finite(m.ItlP50);
                status.ItlP99 = Finite(m.ItlP99);
                status.MaxPromptTokens = m.MaxPromptTokens;
                status.Draining = m.Draining;
                status.LastSeen = Timestamp.FromDateTimeOffset(m.Timestamp);
            }
            reply.Services.Add(status);
        }
        return Task.FromResult(reply);
    }

    /// <inheritdoc/>
    public override async Task<ConvertReply> Convert(ConvertRequest request, ServerCallContext context)
    {
        ArgumentNullException.ThrowIfNull(request);
        ArgumentNullException.ThrowIfNull(context);
        if (string.IsNullOrWhiteSpace(request.ServiceId))
        {
            throw new RpcException(new Status(StatusCode.InvalidArgument, "service_id is required"));
        }
        if (!double.IsFinite(request.HoldSeconds) || request.HoldSeconds < 0)
        {
            throw new RpcException(new Status(StatusCode.InvalidArgument, "hold_seconds must be 0 or more"));
        }
        var hold = request.HoldSeconds > 0 ? TimeSpan.FromSeconds(request.HoldSeconds) : (TimeSpan?)null;
        var outcome = await Guard(() => _fleet.ConvertAsync(request.ServiceId, [.. request.Layers], request.ToDsla, hold, context.CancellationToken)).ConfigureAwait(false);
        var reply = new ConvertReply { Accepted = outcome.Accepted, Reason = outcome.Reason, Epoch = outcome.Epoch, LayerCount = outcome.LayerCount };
        reply.DslaLayers.Add(outcome.DslaLayers);
        return reply;
    }

    private static double Finite(double value) => double.IsFinite(value) ? value : 0;

    private static string Who(string given, ServerCallContext context) => string.IsNullOrWhiteSpace(given) ? $"admin@{context.Peer}" : given;

    private static PolicyReply Reply(PolicyHistoryEntry entry) => new()
    {
        Version = entry.Version,
        PolicyJson = PolicyParser.Serialize(entry.Policy with { Version = entry.Version }),
        SetAt = Timestamp.FromDateTimeOffset(entry.SetAt),
        SetBy = entry.SetBy,
        Comment = entry.Comment,
    };

    private static async Task<T> Guard<T>(Func<Task<T>> body)
    {
        try
        {
            return await body().ConfigureAwait(false);
        }
        catch (PolicyRejectedException e)
        {
            throw Fail(StatusCode.InvalidArgument, e.Message);
        }
        catch (KeyNotFoundException e)
        {
            throw Fail(StatusCode.NotFound, e.Message);
        }
        catch (ArgumentException e)
        {
            throw Fail(StatusCode.InvalidArgument, e.Message);
        }
        catch (NotLeaderException e)
        {
            throw Fail(StatusCode.FailedPrecondition, e.Message);
        }
        catch (Exception e) when (e is RedisException or TimeoutException)
        {
            throw Fail(StatusCode.Unavailable, e.Message);
        }
    }

    [SuppressMessage("Design", "CA1031", Justification = "Mapped to gRPC status codes.")]
    private static RpcException Fail(StatusCode code, string message) => new(new Status(code, message));
}

using DslaMesh.ModelService.Hosting;
using DslaMesh.Protos.V1;
using Grpc.Core;

namespace DslaMesh.ModelService.Grpc;

/// <summary>
/// The controller's command stream: each epoch-numbered command is applied at a token boundary and answered with
/// the state applied, or why it was rejected (a stale epoch, unknown layers, no DSLA weights).
/// </summary>
public sealed partial class LayerControlGrpcService : LayerControl.LayerControlBase
{
    private readonly ModelHost _host;
    private readonly ILogger<LayerControlGrpcService> _logger;
    private readonly string _serviceId;
    private readonly IHostApplicationLifetime _lifetime;

    public LayerControlGrpcService(ModelHost host, ServiceIdentity identity, IHostApplicationLifetime lifetime, ILogger<LayerControlGrpcService> logger)
    {
        _host = host;
        _logger = logger;
        _serviceId = identity.Id;
        _lifetime = lifetime;
    }

    /// <inheritdoc/>
    public override async Task Control(IAsyncStreamReader<ConversionCommand> requestStream, IServerStreamWriter<ConversionState> responseStream, ServerCallContext context)
    {
        // The controller never ends this stream; end it when the service stops, or graceful shutdown would wait for it
        // until the host's shutdown timeout. The controller reconnects to whatever serves next.
        using var stopping = CancellationTokenSource.CreateLinkedTokenSource(context.CancellationToken, _lifetime.ApplicationStopping);
        try
        {
            await ReadCommandsAsync(requestStream, responseStream, context, stopping.Token).ConfigureAwait(false);
        }
        catch (OperationCanceledException) when (_lifetime.ApplicationStopping.IsCancellationRequested && !context.CancellationToken.IsCancellationRequested)
        {
            // Stopping: complete the call normally.
        }
    }

    private async Task ReadCommandsAsync(IAsyncStreamReader<ConversionCommand> requestStream, IServerStreamWriter<ConversionState> responseStream, ServerCallContext context, CancellationToken cancellationToken)
    {
        await foreach (var command in requestStream.ReadAllAsync(cancellationToken).ConfigureAwait(false))
        {
            var engine = _host.Engine ?? throw new RpcException(new Status(StatusCode.Unavailable, "the model is still loading"));
            var changes = new Dictionary<int, bool>();
            foreach (var target in command.Layers)
            {
                if (target.Kind == LayerKind.Unspecified)
                {
                    throw new RpcException(new Status(StatusCode.InvalidArgument, $"layers[{target.Layer}].kind: must be ATTENTION or DSLA"));
                }
                changes[target.Layer] = target.Kind == LayerKind.Dsla;
            }
            var result = await engine.ApplyAsync(command.Epoch, changes, cancellationToken).ConfigureAwait(false);
            Log.Applied(_logger, command.Issuer, command.Epoch, result.Accepted, result.Reason ?? "", string.Join(",", result.DslaLayers));
            var state = new ConversionState
            {
                Epoch = result.Epoch,
                Accepted = result.Accepted,
                Reason = result.Reason ?? "",
                LayerCount = engine.Model.Config.NumHiddenLayers,
                StallSeconds = result.StallSeconds,
                CommandEpoch = command.Epoch,
                ServiceId = _serviceId,
            };
            state.DslaLayers.Add(result.DslaLayers);
            await responseStream.WriteAsync(state, cancellationToken).ConfigureAwait(false);
        }
    }

    /// <inheritdoc/>
    public override Task<ConversionState> GetState(GetStateRequest request, ServerCallContext context)
    {
        var engine = _host.Engine ?? throw new RpcException(new Status(StatusCode.Unavailable, "the model is still loading"));
        var snapshot = engine.Snapshot;
        var state = new ConversionState { Epoch = snapshot.Epoch, Accepted = true, LayerCount = snapshot.LayerCount, ServiceId = _serviceId };
        state.DslaLayers.Add(snapshot.DslaLayers);
        return Task.FromResult(state);
    }

    private static partial class Log
    {
        [LoggerMessage(10, LogLevel.Information, "Conversion command from {Issuer} epoch {Epoch}: accepted={Accepted} {Reason} dsla=[{Layers}]", EventName = "ConversionCommand")]
        public static partial void Applied(ILogger logger, string issuer, long epoch, bool accepted, string reason, string layers);
    }
}

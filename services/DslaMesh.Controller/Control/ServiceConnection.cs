using System.Threading.Channels;
using DslaMesh.Controller.Hosting;
using DslaMesh.Protos.V1;
using Grpc.Core;
using Grpc.Net.Client;
using Polly;
using Polly.Retry;

namespace DslaMesh.Controller.Control;

/// <summary>What a control stream asks of the component that owns the fleet's desired state.</summary>
public interface IControlStreamOwner
{
    /// <summary>
    /// A (re)connected stream found the service in <paramref name="state"/>; returns the command that re-sends the
    /// desired state (with a fresh epoch where one can be drawn), or null to send nothing.
    /// </summary>
    Task<ConversionCommand?> OnConnectedAsync(string serviceId, ConversionState state, CancellationToken cancellationToken);

    /// <summary>The service answered a command (or reported its state).</summary>
    void OnState(string serviceId, ConversionState state);
}

/// <summary>
/// The one conversion-control stream to a model service. Reconnects with exponential backoff and jitter (Polly) and,
/// after each reconnect, re-sends the desired state. Commands are coalesced: only the newest unsent one matters, since
/// each carries the whole layer mix.
/// </summary>
public sealed partial class ServiceConnection : IAsyncDisposable
{
    private readonly IControlStreamOwner _owner;
    private readonly ControllerOptions _options;
    private readonly TimeProvider _time;
    private readonly ILogger _logger;
    private readonly GrpcChannel _channel;
    private readonly ResiliencePipeline _reconnect;
    private readonly Channel<ConversionCommand> _outbox = Channel.CreateBounded<ConversionCommand>(new BoundedChannelOptions(1) { FullMode = BoundedChannelFullMode.DropOldest });
    private readonly Lock _waitersGate = new();
    private readonly List<(long Epoch, TaskCompletionSource<ConversionState> Done)> _waiters = [];
    private readonly CancellationTokenSource _stop = new();
    private ConversionState? _lastAnswer;
    private Task? _run;
    private volatile bool _connected;

    public ServiceConnection(string serviceId, Uri grpcAddress, IControlStreamOwner owner, ControllerOptions options, TimeProvider time, ILogger logger)
    {
        ServiceId = serviceId;
        Address = grpcAddress;
        _owner = owner;
        _options = options;
        _time = time;
        _logger = logger;
        _channel = GrpcChannel.ForAddress(grpcAddress);
        _reconnect = new ResiliencePipelineBuilder { TimeProvider = time }
            .AddRetry(new RetryStrategyOptions
            {
                ShouldHandle = args => ValueTask.FromResult(args.Outcome.Exception is { } e && e is not OperationCanceledException),
                MaxRetryAttempts = int.MaxValue,
                BackoffType = DelayBackoffType.Exponential,
                UseJitter = true,
                Delay = options.ReconnectDelay,
                MaxDelay = options.MaxReconnectDelay,
                OnRetry = args =>
                {
                    if (args.AttemptNumber is 0 or 10 or 100)
                    {
                        Log.ConnectFailed(_logger, ServiceId, Address, args.AttemptNumber + 1, args.Outcome.Exception?.Message ?? "");
                    }
                    return default;
                },
            })
            .Build();
    }

    /// <summary>The service.</summary>
    public string ServiceId { get; }

    /// <summary>The service's gRPC address.</summary>
    public Uri Address { get; }

    /// <summary>Whether the stream is up.</summary>
    public bool IsConnected => _connected;

    /// <summary>Starts connecting.</summary>
    public void Start() => _run = Task.Run(() => RunAsync(_stop.Token));

    /// <summary>Queues a command (replacing any unsent one).</summary>
    public void Send(ConversionCommand command) => _outbox.Writer.TryWrite(command);

    /// <summary>Waits until the service answers a command with an epoch at least <paramref name="epoch"/>.</summary>
    public Task<ConversionState> WaitForAsync(long epoch, CancellationToken cancellationToken)
    {
        var done = new TaskCompletionSource<ConversionState>(TaskCreationOptions.RunContinuationsAsynchronously);
        lock (_waitersGate)
        {
            // The answer may have come before the caller started waiting.
            if (_lastAnswer is { } answer && answer.CommandEpoch >= epoch)
            {
                return Task.FromResult(answer);
            }
            _waiters.Add((epoch, done));
        }
        return done.Task.WaitAsync(cancellationToken);
    }

    private async Task RunAsync(CancellationToken cancellationToken)
    {
        while (!cancellationToken.IsCancellationRequested)
        {
            AsyncDuplexStreamingCall<ConversionCommand, ConversionState> call;
            try
            {
                call = await _reconnect.ExecuteAsync(ConnectAsync, cancellationToken).ConfigureAwait(false);
            }
            catch (OperationCanceledException) when (cancellationToken.IsCancellationRequested)
            {
                return;
            }
            _connected = true;
            Log.Connected(_logger, ServiceId, Address);
            string? reason = null;
            try
            {
                reason = await PumpAsync(call, cancellationToken).ConfigureAwait(false);
            }
            finally
            {
                _connected = false;
                call.Dispose();
            }
            if (cancellationToken.IsCancellationRequested)
            {
                return;
            }
            Log.Disconnected(_logger, ServiceId, reason ?? "the service ended the stream");
            try
            {
                // The pipeline's first attempt is immediate; a service that accepts and then drops streams must not spin.
                await Task.Delay(_options.ReconnectDelay, _time, cancellationToken).ConfigureAwait(false);
            }
            catch (OperationCanceledException)
            {
                return;
            }
        }
    }

    private async ValueTask<AsyncDuplexStreamingCall<ConversionCommand, ConversionState>> ConnectAsync(CancellationToken cancellationToken)
    {
        var client = new LayerControl.LayerControlClient(_channel);
        var state = await client.GetStateAsync(new GetStateRequest(), deadline: DateTime.UtcNow.AddSeconds(5), cancellationToken: cancellationToken).ConfigureAwait(false);
        _owner.OnState(ServiceId, state);
        var call = client.Control(cancellationToken: cancellationToken);
        try
        {
            while (_outbox.Reader.TryRead(out _))
            {
                // Superseded: the reconnect command below carries the newest desired state.
            }
            if (await _owner.OnConnectedAsync(ServiceId, state, cancellationToken).ConfigureAwait(false) is { } command)
            {
                await call.RequestStream.WriteAsync(command, cancellationToken).ConfigureAwait(false);
            }
            return call;
        }
        catch
        {
            call.Dispose();
            throw;
        }
    }

    private async Task<string?> PumpAsync(AsyncDuplexStreamingCall<ConversionCommand, ConversionState> call, CancellationToken cancellationToken)
    {
        using var linked = CancellationTokenSource.CreateLinkedTokenSource(cancellationToken);
        var reader = ReadAsync(call, linked.Token);
        var writer = WriteAsync(call, linked.Token);
        var first = await Task.WhenAny(reader, writer).ConfigureAwait(false);
        await linked.CancelAsync().ConfigureAwait(false);
        try
        {
            await Task.WhenAll(reader, writer).ConfigureAwait(false);
        }
        catch (Exception) when (first.IsFaulted || linked.IsCancellationRequested)
        {
            // One side failed or was stopped; the reason is taken from the first one below.
        }
        return first.Exception?.GetBaseException().Message;
    }

    private async Task ReadAsync(AsyncDuplexStreamingCall<ConversionCommand, ConversionState> call, CancellationToken cancellationToken)
    {
        await foreach (var state in call.ResponseStream.ReadAllAsync(cancellationToken).ConfigureAwait(false))
        {
            _owner.OnState(ServiceId, state);
            lock (_waitersGate)
            {
                _lastAnswer = state;
                for (var i = _waiters.Count - 1; i >= 0; i--)
                {
                    if (state.CommandEpoch >= _waiters[i].Epoch)
                    {
                        _waiters[i].Done.TrySetResult(state);
                        _waiters.RemoveAt(i);
                    }
                }
            }
        }
    }

    private async Task WriteAsync(AsyncDuplexStreamingCall<ConversionCommand, ConversionState> call, CancellationToken cancellationToken)
    {
        await foreach (var command in _outbox.Reader.ReadAllAsync(cancellationToken).ConfigureAwait(false))
        {
            await call.RequestStream.WriteAsync(command, cancellationToken).ConfigureAwait(false);
        }
    }

    /// <inheritdoc/>
    public async ValueTask DisposeAsync()
    {
        await _stop.CancelAsync().ConfigureAwait(false);
        if (_run is not null)
        {
            try
            {
                await _run.ConfigureAwait(false);
            }
            catch (OperationCanceledException)
            {
                // Stopped.
            }
        }
        lock (_waitersGate)
        {
            foreach (var (_, done) in _waiters)
            {
                done.TrySetCanceled();
            }
            _waiters.Clear();
        }
        _channel.Dispose();
        _stop.Dispose();
    }

    private static partial class Log
    {
        [LoggerMessage(40, LogLevel.Information, "Control stream to {ServiceId} at {Address} is up", EventName = "ControlStreamUp")]
        public static partial void Connected(ILogger logger, string serviceId, Uri address);

        [LoggerMessage(41, LogLevel.Warning, "Control stream to {ServiceId} dropped: {Reason}; reconnecting", EventName = "ControlStreamDown")]
        public static partial void Disconnected(ILogger logger, string serviceId, string reason);

        [LoggerMessage(42, LogLevel.Warning, "Cannot reach {ServiceId} at {Address} (attempt {Attempt}): {Reason}; retrying with backoff", EventName = "ControlConnectFailed")]
        public static partial void ConnectFailed(ILogger logger, string serviceId, Uri address, int attempt, string reason);
    }
}

using Microsoft.Extensions.Options;

namespace DslaMesh.ModelService.Hosting;

/// <summary>
/// On shutdown, before any hosted service stops (so Kestrel still accepts connections): stop admitting (health turns
/// 503 so load balancers move away), let running and queued streams finish up to
/// <see cref="ModelServiceOptions.DrainTimeout"/>, then let the host go on (deregistration, Kestrel, model disposal).
/// </summary>
public sealed partial class DrainService : IHostedLifecycleService
{
    private readonly ModelHost _host;
    private readonly ModelServiceOptions _options;
    private readonly ILogger<DrainService> _logger;

    public DrainService(ModelHost host, IOptions<ModelServiceOptions> options, ILogger<DrainService> logger)
    {
        _host = host;
        _options = options.Value;
        _logger = logger;
    }

    /// <inheritdoc/>
    public Task StartingAsync(CancellationToken cancellationToken) => Task.CompletedTask;

    /// <inheritdoc/>
    public Task StartAsync(CancellationToken cancellationToken) => Task.CompletedTask;

    /// <inheritdoc/>
    public Task StartedAsync(CancellationToken cancellationToken) => Task.CompletedTask;

    /// <inheritdoc/>
    public Task StopAsync(CancellationToken cancellationToken) => Task.CompletedTask;

    /// <inheritdoc/>
    public Task StoppedAsync(CancellationToken cancellationToken) => Task.CompletedTask;

    /// <inheritdoc/>
    public async Task StoppingAsync(CancellationToken cancellationToken)
    {
        if (_host.Engine is not { } engine)
        {
            return;
        }
        var snapshot = engine.Snapshot;
        Log.Draining(_logger, snapshot.Running, snapshot.Waiting, _options.DrainTimeout.TotalSeconds);
        using var timeout = CancellationTokenSource.CreateLinkedTokenSource(cancellationToken);
        timeout.CancelAfter(_options.DrainTimeout);
        try
        {
            await engine.DrainAsync(timeout.Token).ConfigureAwait(false);
            Log.Drained(_logger);
        }
        catch (OperationCanceledException)
        {
            Log.DrainTimedOut(_logger, engine.Snapshot.Running);
        }
    }

    private static partial class Log
    {
        [LoggerMessage(30, LogLevel.Information, "Draining: {Running} running and {Waiting} waiting requests, up to {Seconds} s", EventName = "Draining")]
        public static partial void Draining(ILogger logger, int running, int waiting, double seconds);

        [LoggerMessage(31, LogLevel.Information, "Drained", EventName = "Drained")]
        public static partial void Drained(ILogger logger);

        [LoggerMessage(32, LogLevel.Warning, "Drain timed out with {Running} requests still running", EventName = "DrainTimedOut")]
        public static partial void DrainTimedOut(ILogger logger, int running);
    }
}

using DslaMesh.Engine.Models;
using DslaMesh.Engine.Serving;
using DslaMesh.ModelService.Metrics;
using Microsoft.Extensions.Options;

namespace DslaMesh.ModelService.Hosting;

/// <summary>
/// Loads the model off the request path (health reports Degraded until it is ready) and owns the serving engine.
/// </summary>
public sealed partial class ModelHost : BackgroundService
{
    private readonly ModelServiceOptions _options;
    private readonly ServiceMetrics _metrics;
    private readonly ILogger<ModelHost> _logger;
    private readonly TaskCompletionSource _ready = new(TaskCreationOptions.RunContinuationsAsynchronously);
    private LoadedModel? _loaded;
    private ServingEngine? _engine;

    public ModelHost(IOptions<ModelServiceOptions> options, ServiceMetrics metrics, ILogger<ModelHost> logger)
    {
        _options = options.Value;
        _metrics = metrics;
        _logger = logger;
    }

    /// <summary>Why loading failed, if it did.</summary>
    public Exception? LoadError { get; private set; }

    /// <summary>Describes the served model once loaded.</summary>
    public ServedModel? Model { get; private set; }

    /// <summary>Completes when the model is loaded (or faults when loading failed).</summary>
    public Task Ready => _ready.Task;

    /// <summary>The engine, or null while loading.</summary>
    public ServingEngine? Engine => _engine;

    /// <summary>The tokenizer (text prompts need it).</summary>
    public Engine.Tokenization.TextTokenizer? Tokenizer => _loaded?.Tokenizer;

    /// <inheritdoc/>
    protected override Task ExecuteAsync(CancellationToken stoppingToken) => Task.Run(() =>
    {
        try
        {
            Log.Loading(_logger, _options.ModelPath, _options.Backend.Device);
            var started = TimeProvider.System.GetTimestamp();
            _loaded = LoadedModel.Load(_options.ModelPath, _options.Backend, _options.MaxContextTokens > 0 ? _options.MaxContextTokens : null);
            var model = _loaded.Model;
            var variant = _loaded.AttachDsla(_options.DslaVariant) ? _options.DslaVariant : "none";
            var order = _loaded.ConversionOrder;
            var name = _options.ModelName ?? new DirectoryInfo(_options.ModelPath).Name;
            _engine = new ServingEngine(model, _loaded.Tokenizer, _options.Engine, order, variant, _metrics);
            Model = new ServedModel(name, model.Config.NumHiddenLayers, order, variant, model.ContextLength, model.Config.VocabSize);
            Log.DslaAttached(_logger, variant, _loaded.Dsla?.Layers.Count ?? 0);
            _metrics.SetLayerCount(model.Config.NumHiddenLayers);
            Log.Loaded(_logger, name, model.Config.NumHiddenLayers, TimeProvider.System.GetElapsedTime(started).TotalSeconds);
            _ready.TrySetResult();
        }
        catch (Exception e)
        {
            LoadError = e;
            Log.LoadFailed(_logger, _options.ModelPath, e);
            _ready.TrySetException(e);
        }
    }, stoppingToken);

    /// <inheritdoc/>
    public override void Dispose()
    {
        // Registered as a singleton and as a hosted service, so the container may dispose it twice.
        Interlocked.Exchange(ref _engine, null)?.Dispose();
        Interlocked.Exchange(ref _loaded, null)?.Dispose();
        base.Dispose();
    }

    private static partial class Log
    {
        [LoggerMessage(1, LogLevel.Information, "Loading model from {Path} on {Device}", EventName = "ModelLoading")]
        public static partial void Loading(ILogger logger, string path, string device);

        [LoggerMessage(2, LogLevel.Information, "Model {Name} ready: {Layers} layers, loaded in {Seconds:F1} s", EventName = "ModelLoaded")]
        public static partial void Loaded(ILogger logger, string name, int layers, double seconds);

        [LoggerMessage(4, LogLevel.Information, "DSLA variant {Variant} attached to {Layers} layers", EventName = "DslaAttached")]
        public static partial void DslaAttached(ILogger logger, string variant, int layers);

        [LoggerMessage(3, LogLevel.Critical, "Model load from {Path} failed", EventName = "ModelLoadFailed")]
        public static partial void LoadFailed(ILogger logger, string path, Exception error);
    }
}

/// <summary>What this service serves, for /v1/models, registration and receipts.</summary>
public sealed record ServedModel(string Name, int LayerCount, IReadOnlyList<int> ConversionOrder, string Variant, int ContextLength, int VocabSize);

using System.Collections.Concurrent;
using System.Diagnostics;
using DslaMesh.Engine.Inference;
using DslaMesh.Engine.Models;
using DslaMesh.Engine.Tokenization;
using static TorchSharp.torch;

namespace DslaMesh.Engine.Serving;

/// <summary>
/// Continuous batching over one model on one device. A single engine thread owns every tensor: at each token boundary
/// it applies pending layer conversions, admits waiting requests within the batch and KV budgets, runs one prefill
/// chunk (so long prompts never stall running streams), then one decode step for every running sequence, grouped by
/// layer mix (sequences whose mixes differ run in separate passes).
/// </summary>
public sealed partial class ServingEngine : IDisposable
{
    private readonly LlamaForCausalLM _model;
    private readonly TextTokenizer? _tokenizer;
    private readonly ServingEngineOptions _options;
    private readonly IReadOnlyList<int> _conversionOrder;
    private readonly ConcurrentQueue<GenerationRequest> _incoming = new();
    private readonly ConcurrentQueue<ConversionCommand> _commands = new();
    private readonly LinkedList<GenerationRequest> _waiting = new();
    private readonly List<ActiveSequence> _active = [];
    private readonly SemaphoreSlim _signal = new(0);
    private readonly CancellationTokenSource _shutdown = new();
    private readonly Thread _thread;
    private readonly bool[] _mix;
    private readonly IServingObserver _observer;
    private int _queued;
    private int _disposed;
    private volatile int _activeCount;
    private long _epoch = -1;
    private volatile bool _draining;
    private volatile EngineSnapshot _snapshot;
    private readonly TaskCompletionSource<EngineReadiness> _ready = new(TaskCreationOptions.RunContinuationsAsynchronously);

    public ServingEngine(LlamaForCausalLM model, TextTokenizer? tokenizer, ServingEngineOptions options, IReadOnlyList<int> conversionOrder, string variant, IServingObserver? observer = null)
    {
        _model = model;
        _tokenizer = tokenizer;
        _options = options;
        _conversionOrder = conversionOrder;
        Variant = variant;
        _observer = observer ?? NullServingObserver.Instance;
        _mix = new bool[model.Config.NumHiddenLayers];
        _snapshot = BuildSnapshot(0, 0);
        _thread = new Thread(Loop) { IsBackground = true, Name = "dslamesh-engine" };
        _thread.Start();
    }

    /// <summary>Completes once the engine has prepared what it prepares before serving (decode graphs on CUDA).</summary>
    public Task<EngineReadiness> Ready => _ready.Task;

    /// <summary>The DSLA variant this engine converts to.</summary>
    public string Variant { get; }

    /// <summary>The model served.</summary>
    public LlamaForCausalLM Model => _model;

    /// <summary>The latest state, refreshed every iteration (safe to read from any thread).</summary>
    public EngineSnapshot Snapshot => _snapshot;

    /// <summary>Whether the engine has stopped admitting requests.</summary>
    public bool IsDraining => _draining;

    /// <summary>Queues a request; its events stream from the returned reader until a final completion or error.</summary>
    /// <exception cref="QueueFullException">Too many requests are waiting.</exception>
    /// <exception cref="DrainingException">The engine is draining.</exception>
    /// <exception cref="ContextLengthException">Prompt plus max tokens exceed the model's context.</exception>
    public System.Threading.Channels.ChannelReader<GenerationEvent> Submit(GenerationRequest request)
    {
        ArgumentNullException.ThrowIfNull(request);
        request.Sampling.EnsureValid();
        if (request.PromptIds.Count == 0)
        {
            throw new ArgumentException("The prompt is empty.", nameof(request));
        }
        TextGenerator.EnsureInVocabulary(request.PromptIds, _model.Config.VocabSize);
        var needed = request.PromptIds.Count + request.Sampling.MaxTokens;
        if (needed > _model.ContextLength)
        {
            throw new ContextLengthException(needed, _model.ContextLength);
        }
        if (_draining)
        {
            throw new DrainingException();
        }
        if (Interlocked.Increment(ref _queued) > _options.MaxQueuedRequests + Math.Max(0, _options.MaxBatchSize - _activeCount))
        {
            Interlocked.Decrement(ref _queued);
            throw new QueueFullException(_options.MaxQueuedRequests, _options.RetryAfter);
        }
        request.SubmittedTimestamp = Stopwatch.GetTimestamp();
        _incoming.Enqueue(request);
        request.CancellationToken.Register(() => _signal.Release());
        _signal.Release();
        return request.Events.Reader;
    }

    /// <summary>
    /// Asks for layers to change kind at the next token boundary. Commands older than the last applied epoch are
    /// rejected; the result says what the engine runs afterwards.
    /// </summary>
    public Task<ConversionResult> ApplyAsync(long epoch, IReadOnlyDictionary<int, bool> dslaByLayer, CancellationToken cancellationToken = default)
    {
        var command = new ConversionCommand(epoch, dslaByLayer);
        _commands.Enqueue(command);
        _signal.Release();
        return command.Completion.Task.WaitAsync(cancellationToken);
    }

    /// <summary>Stops admitting requests; running and queued ones finish.</summary>
    public void BeginDrain()
    {
        _draining = true;
        _signal.Release();
    }

    /// <summary>Stops admitting requests; completes when no request is left or the token fires.</summary>
    public async Task DrainAsync(CancellationToken cancellationToken)
    {
        _draining = true;
        _signal.Release();
        while (_snapshot.Running + _snapshot.Waiting > 0 || !_incoming.IsEmpty)
        {
            await Task.Delay(20, cancellationToken).ConfigureAwait(false);
        }
    }

    private void Loop()
    {
        using var mode = inference_mode();
        if (_options.PrepareDecodeGraphs)
        {
            // Before the first request: capturing a batch size mid-stream would stall every stream of that step.
            var watch = System.Diagnostics.Stopwatch.StartNew();
            try
            {
                var sizes = _model.PrepareDecodeGraphs(_options.MaxBatchSize);
                _ready.TrySetResult(new EngineReadiness(sizes, watch.Elapsed));
            }
            catch (Exception e) when (e is not OutOfMemoryException)
            {
                _ready.TrySetException(e);
            }
        }
        _ready.TrySetResult(new EngineReadiness(0, TimeSpan.Zero));
        while (!_shutdown.IsCancellationRequested)
        {
            var busy = false;
            try
            {
                busy |= ApplyCommands();
                Admit();
                busy |= Prefill();
                busy |= Decode();
                Reap();
            }
            catch (Exception e) when (e is not OutOfMemoryException)
            {
                FailAll(e);
            }
            _activeCount = _active.Count;
            _snapshot = BuildSnapshot(_waiting.Count + _incoming.Count, _active.Count);
            if (!busy)
            {
                _signal.Wait(TimeSpan.FromMilliseconds(50));
            }
        }
        FailAll(new OperationCanceledException("The engine stopped."));
    }

    /// <inheritdoc/>
    public void Dispose()
    {
        if (Interlocked.Exchange(ref _disposed, 1) != 0)
        {
            return;
        }
        _shutdown.Cancel();
        _signal.Release();
        _thread.Join(TimeSpan.FromSeconds(30));
        _shutdown.Dispose();
        _signal.Dispose();
    }
}

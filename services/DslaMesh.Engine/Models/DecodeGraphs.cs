using DslaMesh.Engine.Backends;
using DslaMesh.Engine.Inference;
using static TorchSharp.torch;

namespace DslaMesh.Engine.Models;

/// <summary>
/// Runs decode steps (one new token per row, every layer softmax attention) as L + 1 segments cut at each layer's
/// attention core, and on CUDA replays each segment as a CUDA graph captured once per batch size.
/// </summary>
/// <remarks>
/// Segment 0 is layer 0's input norm and Q/K/V projection with RoPE; segment i (0 &lt; i &lt; L) is layer i − 1's
/// output projection and MLP (both adding into the residual stream) followed by layer i's norm and projection; segment
/// L is the last layer's output projection and MLP, the final norm and the LM head. Between segments the attention
/// core runs op by op as in any other pass (append to each row's KV cache, SDPA over it), because its shapes grow every
/// step. A graph replays its kernels on fixed addresses, so segments read and write only tensors of a
/// <see cref="SegmentSet"/>: the residual stream, the attention output and the RoPE tables of the step, which the step
/// fills before the first replay. A 32-layer step then costs 33 graph launches plus the attention cores on the host,
/// instead of ~15 kernel launches and ~45 other native calls per layer.
/// </remarks>
internal sealed class DecodeGraphs : IDisposable
{
    /// <summary>Batch sizes with captured graphs at most; a larger variety runs op by op.</summary>
    private const int MaxBatchSizes = 64;

    private readonly LlamaForCausalLM _model;
    private readonly bool _capture;
    private readonly Dictionary<long, SegmentSet> _sets = [];
    private readonly Lock _gate = new();

    public DecodeGraphs(LlamaForCausalLM model, DecodeGraphMode mode)
    {
        _model = model;
        _capture = mode == DecodeGraphMode.Auto;
        Enabled = mode switch
        {
            DecodeGraphMode.Segmented => true,
            DecodeGraphMode.Auto => model.Device.type == TorchSharp.DeviceType.CUDA && CudaGraph.IsAvailable,
            _ => false,
        };
        Status = mode switch
        {
            DecodeGraphMode.Off => "off",
            DecodeGraphMode.Segmented => "segmented (no capture)",
            _ when Enabled => "cuda graphs",
            _ when model.Device.type != TorchSharp.DeviceType.CUDA => "off (not CUDA)",
            _ => $"off ({CudaGraph.UnavailableReason})",
        };
    }

    /// <summary>Whether decode steps may take this path at all.</summary>
    public bool Enabled { get; }

    /// <summary>How decode steps run, in words (benchmarks report it).</summary>
    public string Status { get; }

    /// <summary>Whether this step can run here: one token per row, caches, no gradients, every layer softmax with fused weights.</summary>
    public bool Handles(long tokens, long rows, IReadOnlyList<SequenceCache>? caches, IReadOnlyList<bool>? dslaLayers)
    {
        if (!Enabled || tokens != 1 || caches is null || is_grad_enabled() || (dslaLayers is not null && dslaLayers.Contains(true)))
        {
            return false;
        }
        lock (_gate)
        {
            if (!_sets.ContainsKey(rows) && _sets.Count >= MaxBatchSizes)
            {
                return false;
            }
        }
        foreach (var layer in _model.Layers)
        {
            if (!layer.Attention.AddsInPlace || !layer.Attention.UsesFusedProjections || !layer.Mlp.AddsInPlace)
            {
                return false;
            }
        }
        return true;
    }

    /// <summary>
    /// Captures the graphs of every batch size from 1 to <paramref name="maxRows"/> now (what the first decode step of
    /// each size would do), so that serving never pauses to capture: continuous batching meets most sizes within its
    /// first seconds. A no-op unless graphs are captured. Returns how many sizes were captured.
    /// </summary>
    public int Prepare(int maxRows)
    {
        if (!Enabled || !_capture)
        {
            return 0;
        }
        var captured = 0;
        using var mode = inference_mode();
        lock (_gate)
        {
            for (var rows = 1L; rows <= Math.Min(maxRows, MaxBatchSizes); rows++)
            {
                if (!_sets.ContainsKey(rows))
                {
                    _sets[rows] = NewSet(rows);
                    captured++;
                }
            }
        }
        return captured;
    }

    private SegmentSet NewSet(long rows)
    {
        var set = new SegmentSet(_model, rows);
        if (_capture)
        {
            try
            {
                set.Capture();
            }
            catch
            {
                set.Dispose();
                throw;
            }
        }
        return set;
    }

    /// <summary>One decode step: ids [B, 1] continue caches[b]; returns last-position logits [B, 1, V] (the caller's).</summary>
    public Tensor Forward(Tensor ids, IReadOnlyList<SequenceCache> caches)
    {
        using var scope = NewDisposeScope();
        var rows = ids.shape[0];
        lock (_gate)
        {
            if (!_sets.TryGetValue(rows, out var set))
            {
                set = NewSet(rows);
                _sets[rows] = set;
            }
            using var context = _model.CreateContext(ids, caches, null);
            set.Load(_model.Embed(ids), context);
            var layers = _model.Layers;
            for (var segment = 0; segment <= layers.Count; segment++)
            {
                set.Run(segment);
                if (segment < layers.Count)
                {
                    var (q, k, v) = set.Projections(segment);
                    // The decode kernel writes straight into the next segment's input; other paths return a tensor to copy.
                    var merged = layers[segment].Attention.MixProjected(q, k, v, context, segment, set.Attention);
                    if (!ReferenceEquals(merged, set.Attention))
                    {
                        set.SetAttentionOutput(merged);
                    }
                }
            }
            foreach (var cache in caches)
            {
                cache.Advance(1);
            }
            // The graph rewrites its logits on the next replay; the caller gets its own copy.
            return set.Logits.clone().MoveToOuterDisposeScope();
        }
    }

    /// <inheritdoc/>
    public void Dispose()
    {
        lock (_gate)
        {
            foreach (var set in _sets.Values)
            {
                set.Dispose();
            }
            _sets.Clear();
        }
    }

    /// <summary>
    /// The fixed tensors of one batch size B and, when captured, one graph per segment. Hidden [B, 1, D] is the
    /// residual stream, Attention [B, 1, H·hd] the attention core's output, Cos and SinSigned [B, 1, 1, hd] the step's
    /// RoPE tables; each segment's outputs (q, k, v of the next layer, or the logits) are kept here too.
    /// </summary>
    private sealed class SegmentSet : IDisposable
    {
        private readonly LlamaForCausalLM _model;
        private readonly long _rows;
        private readonly Tensor _hidden;
        private readonly Tensor _attention;
        private readonly Tensor _cos;
        private readonly Tensor _sinSigned;
        private readonly bool _rotatesInGraphs;   // some layer applies RoPE inside its segment (the others' kernel does it)
        private readonly (Tensor Q, Tensor K, Tensor V)?[] _projections;
        private Tensor? _logits;
        private CudaGraph[]? _graphs;

        public SegmentSet(LlamaForCausalLM model, long rows)
        {
            _model = model;
            _rows = rows;
            var config = model.Config;
            var (dtype, device) = (model.DType, model.Device);
            _hidden = zeros([rows, 1, config.HiddenSize], dtype: dtype, device: device).DetachFromDisposeScope();
            _attention = zeros([rows, 1, config.NumAttentionHeads * config.HeadDim], dtype: dtype, device: device).DetachFromDisposeScope();
            _cos = zeros([rows, 1, 1, config.HeadDim], dtype: dtype, device: device).DetachFromDisposeScope();
            _sinSigned = zeros([rows, 1, 1, config.HeadDim], dtype: dtype, device: device).DetachFromDisposeScope();
            _rotatesInGraphs = model.Layers.Any(layer => !layer.Attention.DecodeRotatesInKernel);
            _projections = new (Tensor, Tensor, Tensor)?[config.NumHiddenLayers];
        }

        /// <summary>The LM head's output of the last run [B, 1, V].</summary>
        public Tensor Logits => _logits ?? throw new InvalidOperationException("The last segment has not run.");

        /// <summary>q, k, v of a layer from the last run of the segment that ends with its projection.</summary>
        public (Tensor Q, Tensor K, Tensor V) Projections(int layer) => _projections[layer] ?? throw new InvalidOperationException($"Layer {layer}'s projection has not run.");

        /// <summary>Fills the step's inputs: embeddings [B, 1, D] and, when a segment reads them, the context's RoPE tables.</summary>
        public void Load(Tensor embeddings, ForwardContext context)
        {
            _hidden.copy_(embeddings);
            if (_rotatesInGraphs)
            {
                _cos.copy_(context.CosTokenMajor);
                _sinSigned.copy_(context.SinSignedTokenMajor!);
            }
        }

        /// <summary>Where the next segment reads a layer's attention output [B, 1, H·hd].</summary>
        public Tensor Attention => _attention;

        /// <summary>Writes a layer's attention output [B, 1, H·hd] where the next segment reads it.</summary>
        public void SetAttentionOutput(Tensor merged) => _attention.copy_(merged);

        /// <summary>Runs one segment: a graph replay once captured, else its ops.</summary>
        public void Run(int segment)
        {
            if (_graphs is not null)
            {
                _graphs[segment].Replay();
                return;
            }
            Release(segment);
            Record(segment);
        }

        /// <summary>Captures every segment into its own graph (after one uncaptured warm-up run of each).</summary>
        public void Capture()
        {
            var count = _model.Layers.Count + 1;
            _graphs = CudaGraph.CaptureAll(_model.Device, count,
                warmUp: segment =>
                {
                    Record(segment);
                    Release(segment);
                },
                record: Record);
        }

        private void Record(int segment)
        {
            using var scope = NewDisposeScope();
            var layers = _model.Layers;
            if (segment > 0)
            {
                var previous = layers[segment - 1];
                previous.Attention.AddOutputTo(_hidden, _attention);
                previous.Mlp.AddTo(_hidden, _hidden, previous.PostAttentionNorm);
            }
            if (segment < layers.Count)
            {
                var layer = layers[segment];
                // The decode kernel rotates q and k itself (from the step's context); other paths rotate here.
                var (q, k, v) = layer.Attention.DecodeRotatesInKernel
                    ? layer.Attention.ProjectUnrotated(_hidden, layer.InputNorm)
                    : layer.Attention.ProjectFused(layer.InputNorm.forward(_hidden), _rows, 1, _cos, _sinSigned);
                _projections[segment] = (q.DetachFromDisposeScope(), k.DetachFromDisposeScope(), v.DetachFromDisposeScope());
            }
            else
            {
                _logits = _model.Logits(_hidden).DetachFromDisposeScope();
            }
        }

        private void Release(int segment)
        {
            if (segment < _projections.Length)
            {
                if (_projections[segment] is var (q, k, v))
                {
                    q.Dispose();
                    k.Dispose();
                    v.Dispose();
                }
                _projections[segment] = null;
            }
            else
            {
                _logits?.Dispose();
                _logits = null;
            }
        }

        public void Dispose()
        {
            // The kept outputs live in the graphs' pools: free them before the graphs release their pools.
            for (var segment = 0; segment <= _projections.Length; segment++)
            {
                Release(segment);
            }
            foreach (var graph in _graphs ?? [])
            {
                graph.Dispose();
            }
            _hidden.Dispose();
            _attention.Dispose();
            _cos.Dispose();
            _sinSigned.Dispose();
        }
    }
}

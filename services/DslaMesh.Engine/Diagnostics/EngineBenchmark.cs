using System.Diagnostics;
using System.Runtime.InteropServices;
using System.Text.Json.Serialization;
using DslaMesh.Engine.Backends;
using DslaMesh.Engine.Inference;
using DslaMesh.Engine.Kernels;
using DslaMesh.Engine.Models;
using TorchSharp;
using static TorchSharp.torch;

namespace DslaMesh.Engine.Diagnostics;

/// <summary>What <see cref="EngineBenchmark"/> measures and how.</summary>
public sealed record EngineBenchmarkSettings
{
    /// <summary>The model shape (weights are random).</summary>
    public required LlamaConfig Config { get; init; }

    /// <summary>Weights, activations and KV cache dtype.</summary>
    public ScalarType DType { get; init; } = ScalarType.BFloat16;

    /// <summary>Prompt lengths for prefill (batch 1).</summary>
    public IReadOnlyList<int> PrefillTokens { get; init; } = [1024, 4096, 8192, 16384];

    /// <summary>Batch sizes for decode.</summary>
    public IReadOnlyList<int> DecodeBatches { get; init; } = [1, 8, 32];

    /// <summary>Tokens already in every sequence's KV cache when decode is timed.</summary>
    public IReadOnlyList<int> DecodeContexts { get; init; } = [1024, 4096, 8192, 16384];

    /// <summary>Untimed runs before each measurement.</summary>
    public int Warmup { get; init; } = 2;

    /// <summary>Timed prefill passes per length (the median is reported).</summary>
    public int PrefillRepeats { get; init; } = 3;

    /// <summary>Timed decode steps per (batch, context) (the median is reported).</summary>
    public int DecodeSteps { get; init; } = 16;

    /// <summary>
    /// Timed decode steps of each cell bracketed by cuProfilerStart/Stop (CUDA only), for Nsight Compute started with
    /// <c>--profile-from-start off</c>: it then profiles those steps' kernels and nothing else. 0: none.
    /// </summary>
    public int ProfiledSteps { get; init; }

    /// <summary>Size of the buffer copied device-to-device to measure bandwidth.</summary>
    public long CopyBytes { get; init; } = 1L << 30;

    /// <summary>Device memory kept free beyond what a measurement is computed to need.</summary>
    public long ReserveBytes { get; init; } = 2L << 30;

    /// <summary>Seed for weights and inputs.</summary>
    public long Seed { get; init; } = 1234;

    /// <summary>Weight layout and fused kernels of the model under test.</summary>
    public LlamaKernelOptions Kernels { get; init; } = LlamaKernelOptions.Default;

    /// <summary>Also measure the host time of single operations of a decode step (batch 1, context 1024) into the notes.</summary>
    public bool HostProfile { get; init; }

    /// <summary>Measure decode before prefill (to see whether long prefills leave the process slower).</summary>
    public bool DecodeFirst { get; init; }

    /// <summary>Also time the plain kernels (<see cref="LlamaKernelOptions.Plain"/>) at the first prefill length and batch-1 context: before/after.</summary>
    public bool ComparePlain { get; init; }

    /// <summary>Also time every decode cell with decode graphs off (<see cref="DecodeGraphMode.Off"/>): before/after, same run.</summary>
    public bool CompareWithoutGraphs { get; init; }

    /// <summary>Also time every decode cell with KV copies, SDPA, LibTorch GEMMs and LibTorch's norm instead of the engine's kernels: before/after, same run.</summary>
    public bool CompareWithoutDecodeKernel { get; init; }

    /// <summary>Also time every decode cell with <see cref="LlamaKernelOptions.NormIntoProjections"/> the other way: A/B, same run.</summary>
    public bool CompareNormIntoProjections { get; init; }
}

/// <summary>One prefill measurement. Status is <c>ok</c> or <c>oom</c>.</summary>
public sealed record PrefillMeasurement(int Tokens, double? Ms, string Status, [property: JsonPropertyName("needs_gib")] double NeedsGiB);

/// <summary>One decode measurement: milliseconds per step, each step producing one token for each of the batch's sequences.</summary>
/// <remarks><see cref="HostMsPerStep"/> is the median time the host spent issuing a step (before waiting for the device): when it is
/// close to <see cref="MsPerStep"/>, decode is bound by kernel launches, not by the GPU.</remarks>
public sealed record DecodeMeasurement(int Batch, int Context, double? MsPerStep, string Status, [property: JsonPropertyName("needs_gib")] double NeedsGiB, double? HostMsPerStep = null)
{
    /// <summary>Tokens per second over the batch.</summary>
    public double? TokensPerSecond => MsPerStep is { } ms ? Batch * 1000.0 / ms : null;
}

/// <summary>The model a report measured.</summary>
public sealed record BenchmarkModelInfo(int Hidden, int Layers, int Heads, int KvHeads, int Intermediate, int Vocab, long Parameters, long WeightBytes, long WeightReadBytes);

/// <summary>The same kernels measured with the plain path, for a before/after comparison.</summary>
public sealed record PlainKernelMeasurements(IReadOnlyList<PrefillMeasurement> Prefill, IReadOnlyList<DecodeMeasurement> Decode);

/// <summary>A benchmark run: the schema <c>deploy/gpu/bench_transformers.py</c> writes too.</summary>
public sealed record BenchmarkReport
{
    public required string Engine { get; init; }
    public required string Device { get; init; }
    [JsonPropertyName("dtype")]
    public required string DType { get; init; }
    public required BenchmarkModelInfo Model { get; init; }
    /// <summary>Device-to-device copy, bytes read plus written per second, in GB/s (10⁹).</summary>
    [JsonPropertyName("copy_bandwidth_gbps")]
    public double? CopyBandwidthGBps { get; init; }
    /// <summary>Weight bytes one decode step reads over the copy bandwidth.</summary>
    public double? WeightReadBoundMs { get; init; }
    public required IReadOnlyList<PrefillMeasurement> Prefill { get; init; }
    public required IReadOnlyList<DecodeMeasurement> Decode { get; init; }
    public PlainKernelMeasurements? PlainKernels { get; init; }
    /// <summary>The decode cells again with decode graphs off (when asked for and the main run used them).</summary>
    public IReadOnlyList<DecodeMeasurement>? DecodeWithoutGraphs { get; init; }
    /// <summary>The decode cells again without the decode kernels (when asked for and the main run used them).</summary>
    public IReadOnlyList<DecodeMeasurement>? DecodeWithoutKernel { get; init; }
    /// <summary>The decode cells again with the norms fused into the projections the other way (when asked for).</summary>
    public IReadOnlyList<DecodeMeasurement>? DecodeNormIntoProjectionsSwapped { get; init; }
    public IReadOnlyDictionary<string, string> Notes { get; init; } = new Dictionary<string, string>();
    public required string Timestamp { get; init; }
}

/// <summary>
/// Times prefill and decode of a Llama-shaped model with random weights, built directly on the device: CUDA
/// synchronisation around every timed region, warm-ups first, medians reported. Decode starts from KV caches filled
/// with random keys and values to the requested context (one shared <see cref="KvBatch"/> per layer), so a batch of
/// 32 × 16k costs no prefill; a measurement that cannot fit is reported as <c>oom</c> with the memory it needs.
/// </summary>
public static class EngineBenchmark
{
    private const double GiB = 1024.0 * 1024 * 1024;

    /// <summary>Runs every measurement the settings ask for. <paramref name="progress"/> receives one line per step.</summary>
    public static BenchmarkReport Run(EngineBenchmarkSettings settings, Device device, Action<string>? progress = null)
    {
        ArgumentNullException.ThrowIfNull(settings);
        ArgumentNullException.ThrowIfNull(device);
        var log = progress ?? (_ => { });
        var config = settings.Config;
        var cuda = device.type == DeviceType.CUDA;
        var maxPositions = Math.Max(settings.PrefillTokens.DefaultIfEmpty(1).Max(), settings.DecodeContexts.DefaultIfEmpty(1).Max() + settings.Warmup + settings.DecodeSteps + 1);
        if (settings.HostProfile)
        {
            maxPositions = Math.Max(maxPositions, 1024 + (3 * 205) + 16);
        }
        var notes = new Dictionary<string, string>(StringComparer.Ordinal)
        {
            ["fuse_projections"] = settings.Kernels.FuseProjections.ToString(),
            ["fused_rms_norm"] = (settings.Kernels.FusedRmsNorm && AtenShim.HasFusedRmsNorm(device.type)).ToString(),
            ["decode_timing"] = "median of per-step wall times, each step synchronised (forward + argmax of the next token)",
            ["prefill_timing"] = "median of synchronised passes over a fresh KV cache, logits of the last position only",
        };
        if (TorchRuntime.ExternalLibTorchDirectory is { } external)
        {
            notes["libtorch"] = external;
        }
        notes["cudnn_attention"] = AtenShim.CudnnAttentionEnabled()?.ToString() ?? "unknown";
        notes["libtorchsharp_patched_versions"] = LibTorchSharpLoader.PatchedVersions.Count == 0 ? "none" : string.Join(",", LibTorchSharpLoader.PatchedVersions);

        double? bandwidth = null;
        if (settings.CopyBytes > 0)
        {
            bandwidth = MeasureCopyBandwidth(settings.CopyBytes, device, cuda);
            log($"copy bandwidth: {bandwidth:F0} GB/s (read + write, {settings.CopyBytes / GiB:F1} GiB buffer)");
        }

        var launch = MeasureLaunchOverhead(device, cuda);
        notes["host_us_per_small_op"] = launch.ToString("F2", System.Globalization.CultureInfo.InvariantCulture);
        log($"host cost of one small op (TorchSharp → LibTorch → launch): {launch:F2} µs");

        var stopwatch = Stopwatch.StartNew();
        var model = new LlamaForCausalLM(config, settings.DType, device, maxPositions, settings.Kernels);
        BenchmarkModelInfo info;
        IReadOnlyList<PrefillMeasurement> prefill;
        IReadOnlyList<DecodeMeasurement> decode;
        var usedGraphs = false;
        try
        {
            model.InitializeRandom(settings.Seed);
            Sync(device, cuda);
            info = new BenchmarkModelInfo(config.HiddenSize, config.NumHiddenLayers, config.NumAttentionHeads, config.NumKeyValueHeads,
                config.IntermediateSize, config.VocabSize, model.parameters().Sum(p => p.NumberOfElements), model.WeightBytes, model.DecodeWeightReadBytes);
            log($"model: {info.Parameters / 1e9:F2}B parameters, {info.WeightBytes / 1e9:F2} GB of weights, built on {device} in {stopwatch.Elapsed.TotalSeconds:F1} s");
            notes["decode_graphs"] = model.DecodeGraphStatus;
            notes["decode_attention"] = model.DecodeAttentionStatus;
            notes["decode_gemv"] = model.Kernels.DecodeGemvKernel ? $"kernel (≤ {DecodeGemv.MaxRows} rows)" : "libtorch";
            notes["rms_norm"] = model.Layers[0].InputNorm.UsesKernel ? $"kernel (≤ {RmsNormKernel.MaxRows} rows), libtorch beyond" : "libtorch";
            notes["norm_into_projections"] = !settings.Kernels.NormIntoProjections ? "off"
                : model.Layers[0].InputNorm.FusesIntoProjections ? "on (decode GEMV norm variant)" : "asked for, not available here (CUDA and the GEMV kernel only)";
            log($"decode attention: {notes["decode_attention"]}");
            log($"decode steps: {model.DecodeGraphStatus}");
            var budget = cuda && CudaDevice.MemoryInfo() is { } memory ? memory.Free - settings.ReserveBytes : (long?)null;
            if (budget is { } b)
            {
                log($"memory for caches and activations: {b / GiB:F1} GiB (free after weights, less {settings.ReserveBytes / GiB:F0} GiB reserve)");
            }
            if (settings.HostProfile)
            {
                foreach (var (name, micros) in ProfileHost(model, device, cuda))
                {
                    notes[$"host_us_{name}"] = micros.ToString("F1", System.Globalization.CultureInfo.InvariantCulture);
                    log($"host µs per call, {name}: {micros:F1}");
                }
            }
            var early = settings.DecodeFirst ? MeasureDecodeGrid(model, settings, device, cuda, budget, log) : null;
            prefill = settings.PrefillTokens.Select(t => MeasurePrefill(model, t, settings, device, cuda, budget, log)).ToList();
            decode = early ?? MeasureDecodeGrid(model, settings, device, cuda, budget, log);
            usedGraphs = model.DecodeGraphStatus == "cuda graphs";
        }
        finally
        {
            model.Dispose();
        }

        // The decode grid again on a second model built with other kernel options (same weights: same seed).
        List<DecodeMeasurement> MeasureVariant(LlamaKernelOptions kernels, string what)
        {
            log(what);
            using var variant = new LlamaForCausalLM(config, settings.DType, device, maxPositions, kernels);
            variant.InitializeRandom(settings.Seed);
            var budget = cuda && CudaDevice.MemoryInfo() is { } memory ? memory.Free - settings.ReserveBytes : (long?)null;
            return MeasureDecodeGrid(variant, settings, device, cuda, budget, log);
        }
        var withoutGraphs = settings.CompareWithoutGraphs && usedGraphs
            ? MeasureVariant(settings.Kernels with { DecodeGraphs = DecodeGraphMode.Off }, "decode without CUDA graphs (before/after): every op launched from the host")
            : null;
        var withoutKernel = settings.CompareWithoutDecodeKernel && notes["decode_attention"] == "kernel"
            ? MeasureVariant(settings.Kernels with { DecodeAttentionKernel = false, DecodeGemvKernel = false, RmsNormKernel = false, NormIntoProjections = false },
                "decode with KV copies, SDPA, LibTorch GEMMs and norms instead of the engine's kernels (before/after)")
            : null;
        var normSwapped = settings.CompareNormIntoProjections
            ? MeasureVariant(settings.Kernels with { NormIntoProjections = !settings.Kernels.NormIntoProjections },
                $"decode with the RMS norms {(settings.Kernels.NormIntoProjections ? "as launches of their own" : "fused into the projections' GEMV")} (A/B)")
            : null;

        PlainKernelMeasurements? plain = null;
        if (settings.ComparePlain && settings.PrefillTokens.Count > 0 && settings.DecodeContexts.Count > 0)
        {
            log("plain kernels (before/after): separate Q/K/V and gate/up products, composite RMS norm");
            using var plainModel = new LlamaForCausalLM(config, settings.DType, device, maxPositions, LlamaKernelOptions.Plain);
            plainModel.InitializeRandom(settings.Seed);
            var budget = cuda && CudaDevice.MemoryInfo() is { } memory ? memory.Free - settings.ReserveBytes : (long?)null;
            plain = new PlainKernelMeasurements(
                [MeasurePrefill(plainModel, settings.PrefillTokens[0], settings, device, cuda, budget, log)],
                [MeasureDecode(plainModel, 1, settings.DecodeContexts[0], settings, device, cuda, budget, log)]);
        }

        var readBytes = info.WeightReadBytes;
        return new BenchmarkReport
        {
            Engine = "dslamesh",
            Device = cuda ? CudaDevice.Name(device.index < 0 ? 0 : device.index) ?? "cuda" : $"cpu ({Environment.ProcessorCount} logical cores)",
            DType = settings.DType.ToString().ToLowerInvariant(),
            Model = info,
            CopyBandwidthGBps = bandwidth,
            WeightReadBoundMs = bandwidth is { } bw ? readBytes / (bw * 1e9) * 1000 : null,
            Prefill = prefill,
            Decode = decode,
            PlainKernels = plain,
            DecodeWithoutGraphs = withoutGraphs,
            DecodeWithoutKernel = withoutKernel,
            DecodeNormIntoProjectionsSwapped = normSwapped,
            Notes = notes,
            Timestamp = DateTimeOffset.UtcNow.ToString("yyyy-MM-ddTHH:mm:ssZ", System.Globalization.CultureInfo.InvariantCulture),
        };
    }

    private static List<DecodeMeasurement> MeasureDecodeGrid(LlamaForCausalLM model, EngineBenchmarkSettings settings, Device device, bool cuda, long? budget, Action<string> log) =>
        settings.DecodeBatches
            .SelectMany(b => settings.DecodeContexts.Select(c => (b, c)))
            .Select(p => MeasureDecode(model, p.b, p.c, settings, device, cuda, budget, log))
            .ToList();

    /// <summary>Device-to-device copy of a <paramref name="bytes"/>-byte buffer: (read + written bytes) / time, in GB/s.</summary>
    public static double MeasureCopyBandwidth(long bytes, Device device, bool cuda)
    {
        using var scope = NewDisposeScope();
        using var mode = inference_mode();
        var elements = bytes / sizeof(float);
        var source = empty(elements, dtype: ScalarType.Float32, device: device).uniform_(0, 1);
        var target = empty(elements, dtype: ScalarType.Float32, device: device);
        const int CopiesPerRound = 10;
        for (var i = 0; i < 3; i++)
        {
            target.copy_(source);
        }
        Sync(device, cuda);
        var rounds = new List<double>();
        for (var round = 0; round < 5; round++)
        {
            var watch = Stopwatch.StartNew();
            for (var i = 0; i < CopiesPerRound; i++)
            {
                target.copy_(source);
            }
            Sync(device, cuda);
            rounds.Add(watch.Elapsed.TotalSeconds / CopiesPerRound);
        }
        return 2.0 * elements * sizeof(float) / Median(rounds) / 1e9;
    }

    /// <summary>
    /// Host microseconds per call of the pieces of a batch-1 decode step at context 1024 (issued 200 times in a row,
    /// synchronised only around the loop): where launch-bound decode spends its time.
    /// </summary>
    public static IReadOnlyList<(string Name, double Micros)> ProfileHost(LlamaForCausalLM model, Device device, bool cuda)
    {
        ArgumentNullException.ThrowIfNull(model);
        const int Calls = 200;
        var config = model.Config;
        var results = new List<(string, double)>();
        using var outer = NewDisposeScope();
        using var mode = inference_mode();
        var caches = SequenceCache.AllocateBatch(1, config.NumHiddenLayers, config.NumKeyValueHeads, config.HeadDim, 1024 + (3 * (Calls + 5)) + 8, model.DType, device);
        try
        {
            for (var layer = 0; layer < config.NumHiddenLayers; layer++)
            {
                var storage = ((KvState)caches[0][layer]!).Batch!;
                storage.Keys.normal_();
                storage.Values.normal_();
            }
            caches[0].AssumeProcessed(1024);
            var x = randn(1, 1, config.HiddenSize, dtype: model.DType, device: device);
            var ids = zeros(1, 1, dtype: ScalarType.Int64, device: device);
            // Decode queries as the engine hands them to SDPA: GQA groups folded into the query axis, [1, Hkv, G, hd].
            var q = randn(1, config.NumKeyValueHeads, config.GroupSize, config.HeadDim, dtype: model.DType, device: device);
            var k = randn(1, config.NumKeyValueHeads, 1024, config.HeadDim, dtype: model.DType, device: device);
            var weight = model.Layers[0].Attention.OutputProjection.Weight;
            void Time(string name, Action body)
            {
                for (var i = 0; i < 5; i++)
                {
                    using (NewDisposeScope())
                    {
                        body();   // first use: library handles, lazily loaded kernels
                    }
                }
                Sync(device, cuda);
                var watch = Stopwatch.StartNew();
                for (var i = 0; i < Calls; i++)
                {
                    using (NewDisposeScope())
                    {
                        body();
                    }
                }
                results.Add((name, watch.Elapsed.TotalMilliseconds * 1000 / Calls));
                Sync(device, cuda);
            }
            Time("empty_scope", () => { });
            Time("narrow_view", () => x.narrow(2, 0, 128));
            Time("add", () => x.add(x));
            Time("roll", () => x.roll(64, -1));
            Time("linear_1x4096x4096", () => nn.functional.linear(x, weight));
            Time("rms_norm", () => model.Layers[0].InputNorm.forward(x));
            Time("sdpa_decode_ctx1024", () => nn.functional.scaled_dot_product_attention(q, k, k));
            Time("tensor_from_host", () => tensor(new long[] { 1, 2 }, device: device));
            using (var context = model.CreateContext(ids, caches, null))
            {
                Time("attention", () => model.Layers[0].Attention.Forward(x, context, 0));
                Time("mlp", () => model.Layers[0].Mlp.forward(x));
                Time("decoder_layer", () => model.Layers[0].Forward(x, context));
            }
            Time("create_context", () => model.CreateContext(ids, caches, null).Dispose());
            Time("full_step", () => model.Forward(ids, caches, lastPositionOnly: true));
        }
        finally
        {
            caches[0].Dispose();
        }
        return results;
    }

    /// <summary>Microseconds the host spends per small elementwise op (an in-place add on 4096 elements), issuing 5000 in a row.</summary>
    public static double MeasureLaunchOverhead(Device device, bool cuda)
    {
        using var scope = NewDisposeScope();
        using var mode = inference_mode();
        var x = zeros(4096, dtype: ScalarType.Float32, device: device);
        var rounds = new List<double>();
        for (var round = 0; round < 4; round++)
        {
            Sync(device, cuda);
            var watch = Stopwatch.StartNew();
            for (var i = 0; i < 5000; i++)
            {
                x.add_(1);
            }
            rounds.Add(watch.Elapsed.TotalMilliseconds * 1000 / 5000);
            Sync(device, cuda);
        }
        return Median(rounds.Skip(1).ToList());
    }

    private static PrefillMeasurement MeasurePrefill(LlamaForCausalLM model, int tokens, EngineBenchmarkSettings settings, Device device, bool cuda, long? budget, Action<string> log)
    {
        var config = model.Config;
        var element = model.Embeddings.ElementSize;
        var kv = (long)tokens * config.NumHiddenLayers * 2 * config.NumKeyValueHeads * config.HeadDim * element;
        var qkvWidth = (config.NumAttentionHeads + (2L * config.NumKeyValueHeads)) * config.HeadDim;
        // Peak activations of one layer: hidden states (4 live), qkv + rolled + rotated, gate/up + activation.
        var activations = (long)tokens * element * ((4L * config.HiddenSize) + (3 * qkvWidth) + (3L * config.IntermediateSize));
        var needs = kv + activations;
        if (budget is { } available && needs > available)
        {
            log($"prefill {tokens,6}: OOM (needs {needs / GiB:F1} GiB)");
            return new PrefillMeasurement(tokens, null, "oom", Math.Round(needs / GiB, 2));
        }
        var times = new List<double>();
        try
        {
            manual_seed(settings.Seed + tokens);
            for (var run = 0; run < settings.Warmup + settings.PrefillRepeats; run++)
            {
                using var scope = NewDisposeScope();
                using var mode = inference_mode();
                var ids = randint(0, config.VocabSize, [1, tokens], dtype: ScalarType.Int64, device: device);
                using var cache = new SequenceCache(config.NumHiddenLayers, tokens);
                Sync(device, cuda);
                var watch = Stopwatch.StartNew();
                model.Forward(ids, [cache], lastPositionOnly: true);
                Sync(device, cuda);
                if (run >= settings.Warmup)
                {
                    times.Add(watch.Elapsed.TotalMilliseconds);
                }
            }
        }
        catch (ExternalException e) when (IsOutOfMemory(e))
        {
            log($"prefill {tokens,6}: OOM (needs {needs / GiB:F1} GiB by estimate)");
            return new PrefillMeasurement(tokens, null, "oom", Math.Round(needs / GiB, 2));
        }
        var median = Median(times);
        log($"prefill {tokens,6}: {median,9:F2} ms ({tokens / median:F0} tokens/ms)");
        return new PrefillMeasurement(tokens, Math.Round(median, 3), "ok", Math.Round(needs / GiB, 2));
    }

    private static DecodeMeasurement MeasureDecode(LlamaForCausalLM model, int batch, int context, EngineBenchmarkSettings settings, Device device, bool cuda, long? budget, Action<string> log)
    {
        var config = model.Config;
        var element = model.Embeddings.ElementSize;
        var capacity = context + settings.Warmup + settings.DecodeSteps + 1;
        var kv = (long)batch * capacity * config.NumHiddenLayers * 2 * config.NumKeyValueHeads * config.HeadDim * element;
        var activations = (long)batch * ((8L * config.HiddenSize) + (3L * config.IntermediateSize) + (2L * config.VocabSize)) * sizeof(float);
        var needs = kv + activations;
        if (budget is { } available && needs > available)
        {
            log($"decode batch {batch,2} context {context,6}: OOM (needs {needs / GiB:F1} GiB)");
            return new DecodeMeasurement(batch, context, null, "oom", Math.Round(needs / GiB, 2));
        }
        var caches = Array.Empty<SequenceCache>();
        var times = new List<double>();
        var hostTimes = new List<double>();
        try
        {
            using var outer = NewDisposeScope();
            using var mode = inference_mode();
            caches = SequenceCache.AllocateBatch(batch, config.NumHiddenLayers, config.NumKeyValueHeads, config.HeadDim, capacity, model.DType, device);
            for (var layer = 0; layer < config.NumHiddenLayers; layer++)
            {
                var storage = ((KvState)caches[0][layer]!).Batch!;
                storage.Keys.normal_();
                storage.Values.normal_();
            }
            foreach (var cache in caches)
            {
                cache.AssumeProcessed(context);
            }
            var ids = randint(0, config.VocabSize, [batch, 1], dtype: ScalarType.Int64, device: device).DetachFromDisposeScope();
            try
            {
                for (var step = 0; step < settings.Warmup + settings.DecodeSteps; step++)
                {
                    Sync(device, cuda);
                    var profiled = cuda && step >= settings.Warmup && step < settings.Warmup + settings.ProfiledSteps;
                    if (profiled)
                    {
                        CudaKernels.ProfilerRange(start: true, (int)Math.Max(device.index, 0));
                    }
                    var watch = Stopwatch.StartNew();
                    Tensor next;
                    using (NewDisposeScope())
                    {
                        var logits = model.Forward(ids, caches, lastPositionOnly: true);
                        next = logits.argmax(-1).DetachFromDisposeScope();   // [B, 1]: the next input, never read on the host
                    }
                    var issued = watch.Elapsed.TotalMilliseconds;
                    Sync(device, cuda);
                    if (profiled)
                    {
                        CudaKernels.ProfilerRange(start: false, (int)Math.Max(device.index, 0));
                    }
                    if (step >= settings.Warmup)
                    {
                        times.Add(watch.Elapsed.TotalMilliseconds);
                        hostTimes.Add(issued);
                    }
                    ids.Dispose();
                    ids = next;
                }
            }
            finally
            {
                ids.Dispose();
            }
        }
        catch (ExternalException e) when (IsOutOfMemory(e))
        {
            log($"decode batch {batch,2} context {context,6}: OOM (needs {needs / GiB:F1} GiB by estimate)");
            return new DecodeMeasurement(batch, context, null, "oom", Math.Round(needs / GiB, 2));
        }
        finally
        {
            foreach (var cache in caches)
            {
                cache.Dispose();
            }
        }
        var median = Median(times);
        var host = Median(hostTimes);
        log($"decode batch {batch,2} context {context,6}: {median,8:F2} ms/step ({batch * 1000 / median:F0} tokens/s; host issues a step in {host:F2} ms)");
        return new DecodeMeasurement(batch, context, Math.Round(median, 3), "ok", Math.Round(needs / GiB, 2), Math.Round(host, 3));
    }

    private static bool IsOutOfMemory(ExternalException e) =>
        e.Message.Contains("out of memory", StringComparison.OrdinalIgnoreCase) || e.Message.Contains("OutOfMemory", StringComparison.Ordinal);

    private static void Sync(Device device, bool cuda)
    {
        if (cuda)
        {
            torch.cuda.synchronize(device);
        }
    }

    private static double Median(List<double> values)
    {
        if (values.Count == 0)
        {
            return double.NaN;
        }
        var sorted = values.Order().ToList();
        var mid = sorted.Count / 2;
        return sorted.Count % 2 == 1 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2;
    }
}

using System.CommandLine;
using System.Globalization;
using System.Text;
using System.Text.Json;
using DslaMesh.Engine.Backends;
using DslaMesh.Engine.Diagnostics;
using DslaMesh.Engine.Models;

namespace DslaMesh.Cli.Commands;

/// <summary><c>dslactl bench …</c>: performance measurements (benchmarks, not tests).</summary>
public static class BenchCommands
{
    /// <summary>Builds <c>bench</c> and its subcommands.</summary>
    public static Command Create()
    {
        var bench = new Command("bench", "Performance benchmarks.");
        bench.Subcommands.Add(CreateEngine());
        bench.Subcommands.Add(ServeBenchCommand.Create());
        bench.Subcommands.Add(ReplayBenchCommand.Create());
        return bench;
    }

    private static Command CreateEngine()
    {
        var device = new Option<string>("--device") { Description = "cpu, cuda or cuda:N.", DefaultValueFactory = _ => "cuda" };
        var dtype = new Option<string?>("--dtype") { Description = "float32, bfloat16 or float16 (default: bfloat16 on CUDA, float32 on CPU)." };
        var libTorch = new Option<DirectoryInfo?>("--libtorch") { Description = "CUDA LibTorch folder (default: ask python3 where torch lives)." };
        var hidden = new Option<int>("--hidden") { Description = "Hidden size.", DefaultValueFactory = _ => 4096 };
        var layers = new Option<int>("--layers") { Description = "Decoder layers (shrink for quick runs).", DefaultValueFactory = _ => 32 };
        var heads = new Option<int>("--heads") { Description = "Attention heads.", DefaultValueFactory = _ => 32 };
        var kvHeads = new Option<int?>("--kv-heads") { Description = "Key/value heads (default: --heads)." };
        var intermediate = new Option<int?>("--intermediate") { Description = "MLP width (default: 11008 for hidden 4096, else 8/3·hidden rounded to 256)." };
        var vocab = new Option<int>("--vocab") { Description = "Vocabulary size.", DefaultValueFactory = _ => 32000 };
        var prefill = new Option<string>("--prefill") { Description = "Prompt lengths for prefill, comma-separated.", DefaultValueFactory = _ => "1024,4096,8192,16384" };
        var contexts = new Option<string>("--contexts") { Description = "KV-cache lengths for decode, comma-separated.", DefaultValueFactory = _ => "1024,4096,8192,16384" };
        var batches = new Option<string>("--batches") { Description = "Decode batch sizes, comma-separated.", DefaultValueFactory = _ => "1,8,32" };
        var warmup = new Option<int>("--warmup") { Description = "Untimed runs before each measurement.", DefaultValueFactory = _ => 2 };
        var repeats = new Option<int>("--repeats") { Description = "Timed prefill passes per length.", DefaultValueFactory = _ => 3 };
        var steps = new Option<int>("--steps") { Description = "Timed decode steps per (batch, context).", DefaultValueFactory = _ => 16 };
        var copyMiB = new Option<int>("--copy-mib") { Description = "Buffer size for the copy-bandwidth measurement (0 = skip).", DefaultValueFactory = _ => 1024 };
        var plainKernels = new Option<bool>("--plain-kernels") { Description = "Measure the plain path (separate projections, composite RMS norm) instead of the fused one." };
        var comparePlain = new Option<bool>("--compare-plain") { Description = "Also time the plain path at the first prefill length and batch-1 context (before/after)." };
        var compareWithoutGraphs = new Option<bool>("--compare-without-graphs") { Description = "Also time every decode cell with CUDA graphs off (before/after)." };
        var decodeGraphs = new Option<DecodeGraphMode>("--decode-graphs") { Description = "How decode steps run: Auto (CUDA graphs on CUDA), Off, or Segmented (the graph segments, uncaptured).", DefaultValueFactory = _ => DecodeGraphMode.Auto };
        var noDecodeKernel = new Option<bool>("--no-decode-kernels") { Description = "Run decode steps with KV copies, SDPA, LibTorch GEMMs and LibTorch's RMS norm instead of the engine's CUDA kernels." };
        var noDecodeGemv = new Option<bool>("--no-decode-gemv") { Description = "Keep the decode attention kernel but run projections with LibTorch GEMMs." };
        var compareWithoutDecodeKernel = new Option<bool>("--compare-without-decode-kernels") { Description = "Also time every decode cell with KV copies, SDPA, LibTorch GEMMs and LibTorch's RMS norm instead of the engine's kernels (before/after)." };
        var normIntoProjections = new Option<bool>("--norm-into-projections") { Description = "Apply each decode RMS norm inside the GEMV launch of the product after it (Q/K/V, gate/up, LM head) instead of as a launch of its own." };
        var compareNormIntoProjections = new Option<bool>("--compare-norm-into-projections") { Description = "Also time every decode cell with --norm-into-projections the other way (A/B)." };
        var cudnnAttention = new Option<bool>("--cudnn-attention") { Description = "Let SDPA use cuDNN attention (off by default: it re-plans for every new KV length)." };
        var profileSteps = new Option<int>("--profile-steps") { Description = "Bracket the first N timed decode steps of each cell with cuProfilerStart/Stop, for `ncu --profile-from-start off` (CUDA)." };
        var hostProfile = new Option<bool>("--host-profile") { Description = "Also measure the host time of each piece of a batch-1 decode step." };
        var decodeFirst = new Option<bool>("--decode-first") { Description = "Measure decode before prefill." };
        var seed = new Option<long>("--seed") { Description = "Seed for weights and inputs.", DefaultValueFactory = _ => 1234 };
        var json = new Option<FileInfo?>("--json") { Description = "Write the report as JSON to this file." };

        var command = new Command("engine", "Time prefill and decode of a Llama-2-7B-shaped model with random weights, built on the device.");
        foreach (var option in new Option[] { device, dtype, libTorch, hidden, layers, heads, kvHeads, intermediate, vocab, prefill, contexts, batches, warmup, repeats, steps, copyMiB, plainKernels, comparePlain, compareWithoutGraphs, decodeGraphs, noDecodeKernel, noDecodeGemv, compareWithoutDecodeKernel, normIntoProjections, compareNormIntoProjections, cudnnAttention, profileSteps, hostProfile, decodeFirst, seed, json })
        {
            command.Options.Add(option);
        }
        command.SetAction((result, cancellationToken) => EngineOptions.GuardAsync(async () =>
        {
            var backend = new TorchBackendOptions
            {
                Device = result.GetValue(device) ?? "cuda",
                DType = result.GetValue(dtype),
                LibTorchDirectory = result.GetValue(libTorch)?.FullName,
                CudnnAttention = result.GetValue(cudnnAttention),
            };
            var problems = new List<System.ComponentModel.DataAnnotations.ValidationResult>();
            if (!System.ComponentModel.DataAnnotations.Validator.TryValidateObject(backend, new(backend), problems, validateAllProperties: true))
            {
                throw new ArgumentException(string.Join("; ", problems.Select(p => p.ErrorMessage)));
            }
            var hiddenSize = Positive(result.GetValue(hidden), "--hidden");
            var headCount = Positive(result.GetValue(heads), "--heads");
            var kvHeadCount = Positive(result.GetValue(kvHeads) ?? headCount, "--kv-heads");
            if (hiddenSize % headCount != 0 || headCount % kvHeadCount != 0)
            {
                throw new ArgumentException("--hidden must be a multiple of --heads, and --heads a multiple of --kv-heads.");
            }
            var config = new LlamaConfig
            {
                VocabSize = Positive(result.GetValue(vocab), "--vocab"),
                HiddenSize = hiddenSize,
                IntermediateSize = Positive(result.GetValue(intermediate) ?? DefaultIntermediate(hiddenSize), "--intermediate"),
                NumHiddenLayers = Positive(result.GetValue(layers), "--layers"),
                NumAttentionHeads = headCount,
                NumKeyValueHeads = kvHeadCount,
                HeadDim = hiddenSize / headCount,
                RmsNormEps = 1e-5,
                MaxPositionEmbeddings = 32768,
                Rope = new RopeSettings("default", 10000.0),
            };
            var settings = new EngineBenchmarkSettings
            {
                Config = config,
                DType = TorchRuntime.ResolveDType(backend),
                PrefillTokens = ParseList(result.GetValue(prefill), "--prefill"),
                DecodeContexts = ParseList(result.GetValue(contexts), "--contexts"),
                DecodeBatches = ParseList(result.GetValue(batches), "--batches"),
                Warmup = Math.Max(0, result.GetValue(warmup)),
                PrefillRepeats = Positive(result.GetValue(repeats), "--repeats"),
                DecodeSteps = Positive(result.GetValue(steps), "--steps"),
                ProfiledSteps = Math.Max(0, result.GetValue(profileSteps)),
                CopyBytes = Math.Max(0, result.GetValue(copyMiB)) * 1024L * 1024,
                Seed = result.GetValue(seed),
                Kernels = result.GetValue(plainKernels)
                    ? LlamaKernelOptions.Plain
                    : LlamaKernelOptions.Default with
                    {
                        DecodeGraphs = result.GetValue(decodeGraphs),
                        DecodeAttentionKernel = !result.GetValue(noDecodeKernel),
                        DecodeGemvKernel = !result.GetValue(noDecodeKernel) && !result.GetValue(noDecodeGemv),
                        RmsNormKernel = !result.GetValue(noDecodeKernel),
                        NormIntoProjections = result.GetValue(normIntoProjections),
                    },
                ComparePlain = result.GetValue(comparePlain),
                CompareWithoutGraphs = result.GetValue(compareWithoutGraphs),
                CompareWithoutDecodeKernel = result.GetValue(compareWithoutDecodeKernel),
                CompareNormIntoProjections = result.GetValue(compareNormIntoProjections),
                HostProfile = result.GetValue(hostProfile),
                DecodeFirst = result.GetValue(decodeFirst),
            };
            var torchDevice = TorchRuntime.Initialize(backend);
            var report = EngineBenchmark.Run(settings, torchDevice, line => Console.Error.WriteLine(line));
            await Console.Out.WriteAsync(FormatTable(report)).ConfigureAwait(false);
            if (result.GetValue(json) is { } path)
            {
                if (path.Directory is { } dir)
                {
                    dir.Create();
                }
                await File.WriteAllTextAsync(path.FullName, JsonSerializer.Serialize(report, BenchmarkJsonContext.Default.BenchmarkReport) + "\n", cancellationToken).ConfigureAwait(false);
                await Console.Error.WriteLineAsync($"wrote {path.FullName}").ConfigureAwait(false);
            }
            return ExitCodes.Ok;
        }));
        return command;
    }

    /// <summary>The report as a plain-text table.</summary>
    public static string FormatTable(BenchmarkReport report)
    {
        ArgumentNullException.ThrowIfNull(report);
        var c = CultureInfo.InvariantCulture;
        var text = new StringBuilder();
        var m = report.Model;
        text.AppendLine(c, $"{report.Engine} on {report.Device}, {report.DType}: hidden {m.Hidden}, {m.Layers} layers, {m.Heads}/{m.KvHeads} heads, MLP {m.Intermediate}, vocab {m.Vocab}");
        text.AppendLine(c, $"  {m.Parameters / 1e9:F2}B parameters, {m.WeightBytes / 1e9:F2} GB of weights ({m.WeightReadBytes / 1e9:F2} GB read per decode step)");
        if (report.CopyBandwidthGBps is { } bw && report.WeightReadBoundMs is { } bound)
        {
            text.AppendLine(c, $"  copy bandwidth {bw:F0} GB/s → weight-read bound {bound:F2} ms/step");
        }
        text.AppendLine("prefill (batch 1)      ms");
        foreach (var p in report.Prefill)
        {
            text.AppendLine(c, $"  {p.Tokens,8} tokens  {Cell(p.Ms, p.Status, p.NeedsGiB)}");
        }
        var contexts = report.Decode.Select(d => d.Context).Distinct().ToList();
        text.Append("decode ms/step         ");
        foreach (var context in contexts)
        {
            text.Append(c, $"{$"ctx {context}",22}");
        }
        text.AppendLine();
        foreach (var batch in report.Decode.Select(d => d.Batch).Distinct())
        {
            text.Append(c, $"  batch {batch,-15}");
            foreach (var context in contexts)
            {
                var d = report.Decode.FirstOrDefault(x => x.Batch == batch && x.Context == context);
                var cell = d is null ? "-" : Cell(d.MsPerStep, d.Status, d.NeedsGiB);
                if (d?.MsPerStep is { } ms && batch == 1 && report.WeightReadBoundMs is { } b1)
                {
                    cell += string.Create(c, $" ({ms / b1:F2}×)");
                }
                text.Append(c, $"{cell,22}");
            }
            text.AppendLine();
        }
        if (report.PlainKernels is { } plain)
        {
            foreach (var p in plain.Prefill)
            {
                text.AppendLine(c, $"plain kernels: prefill {p.Tokens} {Cell(p.Ms, p.Status, p.NeedsGiB)} ms");
            }
            foreach (var d in plain.Decode)
            {
                text.AppendLine(c, $"plain kernels: decode batch {d.Batch} ctx {d.Context} {Cell(d.MsPerStep, d.Status, d.NeedsGiB)} ms/step");
            }
        }
        var normInto = report.Notes.TryGetValue("norm_into_projections", out var placement) && placement != "off";
        AppendVariant("without graphs", "graphs", report.DecodeWithoutGraphs);
        AppendVariant("without decode kernels", "kernels", report.DecodeWithoutKernel);
        AppendVariant(normInto ? "norms as launches of their own" : "norms into projections", normInto ? "norms into projections" : "norms as launches of their own", report.DecodeNormIntoProjectionsSwapped);
        return text.ToString();

        // One line per cell of a variant's grid, with the main run's time over the variant's.
        void AppendVariant(string variant, string main, IReadOnlyList<DecodeMeasurement>? cells)
        {
            foreach (var d in cells ?? [])
            {
                var measured = report.Decode.FirstOrDefault(x => x.Batch == d.Batch && x.Context == d.Context);
                var ratio = measured?.MsPerStep is { } with && d.MsPerStep is { } without ? string.Create(c, $" ({main} {with / without:F2}×)") : "";
                text.AppendLine(c, $"{variant}: decode batch {d.Batch} ctx {d.Context} {Cell(d.MsPerStep, d.Status, d.NeedsGiB)} ms/step{ratio}");
            }
        }
    }

    private static string Cell(double? ms, string status, double needsGiB) =>
        ms is { } value ? value.ToString("F2", CultureInfo.InvariantCulture)
        : status == "oom" ? string.Create(CultureInfo.InvariantCulture, $"OOM (needs {needsGiB:F0} GiB)") : status;

    private static int DefaultIntermediate(int hidden) => hidden == 4096 ? 11008 : Math.Max(256, (int)Math.Round(hidden * 8.0 / 3 / 256) * 256);

    private static int Positive(int value, string name) => value > 0 ? value : throw new ArgumentException($"{name} must be positive.");

    private static int[] ParseList(string? text, string name)
    {
        var values = (text ?? string.Empty).Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries);
        return values.Select(v => int.TryParse(v, NumberStyles.Integer, CultureInfo.InvariantCulture, out var n) && n > 0
            ? n
            : throw new ArgumentException($"{name}: '{v}' is not a positive integer.")).ToArray();
    }
}

using System.CommandLine;
using System.Globalization;
using System.Text;
using System.Text.Json;
using DslaMesh.Engine.Backends;
using DslaMesh.Engine.Diagnostics;
using DslaMesh.Engine.Dsla;
using DslaMesh.Engine.Models;

namespace DslaMesh.Cli.Commands;

/// <summary>
/// <c>dslactl bench serve</c>: the continuous-batching engine's throughput, TTFT and inter-token latency against
/// concurrency at several fractions of layers converted, and the stall per live conversion.
/// </summary>
public static class ServeBenchCommand
{
    /// <summary>Builds the command.</summary>
    public static Command Create()
    {
        var model = new Option<DirectoryInfo?>("--model", "-m") { Description = "Model folder with distilled DSLA weights (default: a random model of --shape)." };
        var shape = new Option<string>("--shape") { Description = "Random-weight shape when no --model: 7b (Llama-2-7B) or brown (the default model's).", DefaultValueFactory = _ => "7b" };
        var layers = new Option<int?>("--layers") { Description = "Override the layer count of the random shape (quick runs)." };
        var variant = new Option<string>("--variant") { Description = "DSLA variant to convert to.", DefaultValueFactory = _ => "dsla-foldable" };
        var device = new Option<string>("--device") { Description = "cpu, cuda or cuda:N.", DefaultValueFactory = _ => "cpu" };
        var dtype = new Option<string?>("--dtype") { Description = "float32, bfloat16 or float16." };
        var libTorch = new Option<DirectoryInfo?>("--libtorch") { Description = "CUDA LibTorch folder." };
        var concurrency = new Option<string>("--concurrency") { Description = "Concurrent streams, comma-separated.", DefaultValueFactory = _ => "1,2,4,8,16,32,64" };
        var fractions = new Option<string>("--fractions") { Description = "Fractions of layers converted, comma-separated.", DefaultValueFactory = _ => "0,0.25,0.5" };
        var promptTokens = new Option<int>("--prompt-tokens") { Description = "Prompt length.", DefaultValueFactory = _ => 128 };
        var maxTokens = new Option<int>("--max-tokens") { Description = "Tokens generated per request.", DefaultValueFactory = _ => 32 };
        var requests = new Option<int>("--requests") { Description = "Requests per cell (at least the concurrency).", DefaultValueFactory = _ => 32 };
        var json = new Option<FileInfo?>("--json") { Description = "Write the report as JSON to this file." };
        var noCudaGraphs = new Option<bool>("--no-cuda-graphs") { Description = "Run decode op by op on CUDA instead of replaying CUDA graphs (before/after)." };
        var command = new Command("serve", "Throughput, TTFT and ITL against concurrency at several DSLA fractions, and the stall per conversion.");
        foreach (var option in new Option[] { model, shape, layers, variant, device, dtype, libTorch, concurrency, fractions, promptTokens, maxTokens, requests, json, noCudaGraphs })
        {
            command.Options.Add(option);
        }
        command.SetAction((result, cancellationToken) => EngineOptions.GuardAsync(async () =>
        {
            var backend = new TorchBackendOptions { Device = result.GetValue(device)!, DType = result.GetValue(dtype), LibTorchDirectory = result.GetValue(libTorch)?.FullName, CudaGraphs = !result.GetValue(noCudaGraphs) };
            var variantName = result.GetValue(variant)!;
            var options = new ServingBenchmarkOptions
            {
                Concurrency = ParseList(result.GetValue(concurrency)!, "--concurrency", int.Parse),
                DslaFractions = ParseList(result.GetValue(fractions)!, "--fractions", double.Parse),
                PromptTokens = result.GetValue(promptTokens),
                MaxTokens = result.GetValue(maxTokens),
                RequestsPerLevel = result.GetValue(requests),
                MaxBatchSize = 64,
            };
            LoadedModel? loaded = null;
            LlamaForCausalLM? random = null;
            DslaLayerSet? dsla = null;
            try
            {
                LlamaForCausalLM network;
                IReadOnlyList<int> order;
                string name;
                if (result.GetValue(model) is { } folder)
                {
                    loaded = LoadedModel.Load(folder.FullName, backend);
                    if (!loaded.AttachDsla(variantName))
                    {
                        throw new ArgumentException($"--model: '{folder.FullName}' has no '{variantName}' DSLA weights (run dslactl distill first).");
                    }
                    (network, order, name) = (loaded.Model, loaded.ConversionOrder, folder.Name);
                }
                else
                {
                    var config = RandomShape(result.GetValue(shape)!, result.GetValue(layers), options.PromptTokens + options.MaxTokens);
                    var torchDevice = TorchRuntime.Initialize(backend);
                    random = new LlamaForCausalLM(config, TorchRuntime.ResolveDType(backend), torchDevice, kernels: backend.Kernels);
                    random.InitializeRandom(1234);
                    dsla = DslaLayerSet.Create(random, DslaVariants.Parse(variantName), Enumerable.Range(0, config.NumHiddenLayers), seed: 7);
                    (network, order, name) = (random, Enumerable.Range(0, config.NumHiddenLayers).Reverse().ToArray(), $"random-{result.GetValue(shape)}");
                }
                var report = await ServingBenchmark.RunAsync(network, order, variantName, name, options, line => Console.Error.WriteLine(line), cancellationToken).ConfigureAwait(false);
                await Console.Out.WriteAsync(FormatTable(report)).ConfigureAwait(false);
                if (result.GetValue(json) is { } path)
                {
                    path.Directory?.Create();
                    await File.WriteAllTextAsync(path.FullName, JsonSerializer.Serialize(report, ServingBenchmarkJsonContext.Default.ServingBenchmarkReport) + "\n", cancellationToken).ConfigureAwait(false);
                }
                return ExitCodes.Ok;
            }
            finally
            {
                dsla?.Dispose();
                random?.Dispose();
                loaded?.Dispose();
            }
        }));
        return command;
    }

    /// <summary>The report as a plain-text table.</summary>
    public static string FormatTable(ServingBenchmarkReport report)
    {
        ArgumentNullException.ThrowIfNull(report);
        var c = CultureInfo.InvariantCulture;
        var text = new StringBuilder();
        text.AppendLine(c, $"{report.Model} ({report.Layers} layers, {report.Variant}) on {report.Device}: prompt {report.PromptTokens}, {report.MaxTokens} new tokens");
        text.AppendLine("dsla   conc   tok/s     TTFT p50   TTFT p99   ITL p50   ITL p99   (ms)");
        foreach (var r in report.Rows)
        {
            text.AppendLine(c, $"{r.DslaFraction,4:P0} {r.Concurrency,5} {r.TokensPerSecond,9:F1} {r.TtftP50Ms,10:F1} {r.TtftP99Ms,10:F1} {r.ItlP50Ms,9:F2} {r.ItlP99Ms,9:F2}");
        }
        foreach (var s in report.Stalls)
        {
            text.AppendLine(c, $"conversion of layer {s.Layer} {s.Direction} under {s.RunningStreams} streams: {s.StallMs:F2} ms");
        }
        return text.ToString();
    }

    /// <summary>The random-weight shapes <c>bench serve</c> and <c>model random</c> build.</summary>
    internal static LlamaConfig RandomShape(string shape, int? layers, int context) => shape switch
    {
        "7b" => new LlamaConfig
        {
            VocabSize = 32000, HiddenSize = 4096, IntermediateSize = 11008, NumHiddenLayers = layers ?? 32, NumAttentionHeads = 32, NumKeyValueHeads = 32,
            HeadDim = 128, RmsNormEps = 1e-5, MaxPositionEmbeddings = Math.Max(4096, context), Rope = new RopeSettings("default", 10000),
        },
        "brown" => new LlamaConfig
        {
            VocabSize = 4096, HiddenSize = 256, IntermediateSize = 704, NumHiddenLayers = layers ?? 8, NumAttentionHeads = 4, NumKeyValueHeads = 2,
            HeadDim = 64, RmsNormEps = 1e-5, MaxPositionEmbeddings = Math.Max(2048, context), Rope = new RopeSettings("default", 10000), TieWordEmbeddings = true,
        },
        _ => throw new ArgumentException($"--shape: '{shape}' is not 7b or brown."),
    };

    private static T[] ParseList<T>(string text, string name, Func<string, IFormatProvider, T> parse) =>
        text.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries).Select(v =>
        {
            try
            {
                return parse(v, CultureInfo.InvariantCulture);
            }
            catch (FormatException)
            {
                throw new ArgumentException($"{name}: '{v}' is not a number.");
            }
        }).ToArray();
}

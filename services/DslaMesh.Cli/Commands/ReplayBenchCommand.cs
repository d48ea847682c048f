using System.CommandLine;
using System.Globalization;
using System.Text.Json;
using DslaMesh.Cli.Replay;
using DslaMesh.Engine.Backends;
using DslaMesh.Engine.Data;
using DslaMesh.Engine.Models;
using DslaMesh.Engine.Tokenization;
using DslaMesh.Policy;
using DslaMesh.Protos.V1;
using Grpc.Net.Client;
using Spectre.Console;

namespace DslaMesh.Cli.Commands;

/// <summary>
/// <c>dslactl bench replay</c>: replays an arrival trace through the gateway once per serving mode (adaptive control
/// against static layer mixes, set through the controller's policy) and reports TTFT, per-token latency, goodput,
/// rejections, conversions and the quality of what was served.
/// </summary>
public static class ReplayBenchCommand
{
    /// <summary>Builds the command.</summary>
    public static Command Create()
    {
        var controller = new ControllerClientOptions();
        var gateway = new Option<string>("--gateway") { Description = "The gateway's gRPC (h2c) address.", DefaultValueFactory = _ => "http://127.0.0.1:8081" };
        var apiKey = new Option<string?>("--api-key") { Description = "The gateway API key (default: $DSLAMESH_API_KEY)." };
        var model = new Option<DirectoryInfo>("--model", "-m") { Description = "The served model's folder: its tokenizer cuts the prompts, its context window bounds them, and it scores the served perplexity.", Required = true };
        var corpus = new Option<DirectoryInfo?>("--corpus") { Description = $"Brown corpus folder for prompt text (default: ${BrownCorpus.EnvironmentVariable} or {BrownCorpus.DefaultRelativePath})." };
        var trace = new Option<FileInfo?>("--trace") { Description = "Azure LLM inference trace CSV (TIMESTAMP, ContextTokens, GeneratedTokens); default: generate the paper's mix." };
        var requests = new Option<int>("--requests") { Description = "Generated trace: number of requests.", DefaultValueFactory = _ => 200 };
        var rate = new Option<double>("--rate") { Description = "Generated trace: mean arrivals per second.", DefaultValueFactory = _ => 1 };
        var arrivals = new Option<ArrivalProcess>("--arrivals") { Description = "Generated trace: Poisson or Bursty arrivals.", DefaultValueFactory = _ => ArrivalProcess.Poisson };
        var burstiness = new Option<double>("--burstiness") { Description = "Bursty arrivals: coefficient of variation of the gaps (> 1).", DefaultValueFactory = _ => 3 };
        var outputTokens = new Option<int>("--output-tokens") { Description = "Generated trace: mean output length (uniform in [mean/2, 3·mean/2]).", DefaultValueFactory = _ => 128 };
        var seed = new Option<int>("--seed") { Description = "Seed for the generated trace and the prompt cuts.", DefaultValueFactory = _ => 1234 };
        var lengthScale = new Option<double>("--length-scale") { Description = "Multiply prompt lengths (e.g. 0.125 to fit the paper's 2k–16k prompts to a 2k-context model on CPU); the adaptive policy's MCR lengths scale with it.", DefaultValueFactory = _ => 1 };
        var speedup = new Option<double>("--speedup") { Description = "Divide a trace's arrival times (replay faster than real time).", DefaultValueFactory = _ => 1 };
        var maxOutput = new Option<int>("--max-output-tokens") { Description = "Cap on each request's output length (at most half the model's context window).", DefaultValueFactory = _ => 512 };
        var modes = new Option<string>("--modes") { Description = "Modes to compare, in order: attention, adaptive, dslaNN (static NN% of layers).", DefaultValueFactory = _ => ReplayModes.Default };
        var adaptivePolicy = new Option<FileInfo?>("--adaptive-policy") { Description = "Policy file for the adaptive mode (default: the built-in policy, MCR lengths × --length-scale)." };
        var sloTtft = new Option<double>("--slo-ttft-ms") { Description = "Goodput SLO: time to first token.", DefaultValueFactory = _ => 2000 };
        var sloTpot = new Option<double>("--slo-tpot-ms") { Description = "Goodput SLO: time per output token after the first.", DefaultValueFactory = _ => 100 };
        var repeat = new Option<int>("--repeat") { Description = "Run the whole sequence of modes this many times, interleaved; each mode pools its runs (the VM's drift then touches every mode alike).", DefaultValueFactory = _ => 1 };
        var warmup = new Option<int>("--warmup") { Description = "Unmeasured requests (the trace's first, at their arrival times, half the layers on DSLA) replayed before the first mode.", DefaultValueFactory = _ => 120 };
        var settle = new Option<double>("--settle-seconds") { Description = "How long to wait for every service to reach a mode's starting layer mix.", DefaultValueFactory = _ => 120 };
        var requestTimeout = new Option<double>("--request-timeout-seconds") { Description = "Deadline of each request.", DefaultValueFactory = _ => 600 };
        var sampleMs = new Option<int>("--sample-ms") { Description = "How often the controller is asked for every service's layer mix.", DefaultValueFactory = _ => 250 };
        var pplTokens = new Option<int>("--ppl-tokens") { Description = "Held-out tokens per layer mix for the served perplexity (0 = skip).", DefaultValueFactory = _ => 8192 };
        var pplSeqLen = new Option<int>("--ppl-seq-len") { Description = "Window length for the served perplexity.", DefaultValueFactory = _ => 512 };
        var device = new Option<string>("--device") { Description = "Where the served perplexity is computed: cpu or cuda.", DefaultValueFactory = _ => "cpu" };
        var json = new Option<FileInfo?>("--json") { Description = "Write the report (summaries, every request, the layer-mix timeline) as JSON." };
        var png = new Option<FileInfo?>("--png") { Description = "Write latency over time with each service's layer mix, one panel per mode." };

        var command = new Command("replay", "Replay an arrival trace through the gateway: adaptive against static layer mixes.");
        command.Options.Add(controller.Controller);
        command.Options.Add(controller.Token);
        foreach (var option in new Option[] { gateway, apiKey, model, corpus, trace, requests, rate, arrivals, burstiness, outputTokens, seed, lengthScale, speedup, maxOutput, modes, adaptivePolicy, sloTtft, sloTpot, repeat, warmup, settle, requestTimeout, sampleMs, pplTokens, pplSeqLen, device, json, png })
        {
            command.Options.Add(option);
        }
        // Input and service errors go to the invocation's error writer (ControllerClientOptions); model-load errors to stderr.
        command.SetAction((result, cancellationToken) => EngineOptions.GuardAsync(() => ControllerClientOptions.GuardAsync(result, async output =>
        {
            var error = result.InvocationConfiguration.Error;
            void Log(string line) => error.WriteLine(line);
            var folder = result.GetValue(model)!;
            var config = LlamaConfig.Load(Path.Combine(folder.FullName, "config.json"));
            var scale = result.GetValue(lengthScale);
            var seedValue = result.GetValue(seed);
            var modeList = ParseModes(result.GetValue(modes)!, result.GetValue(adaptivePolicy), scale);

            // The trace, fitted to the model's context window.
            IReadOnlyList<TraceRequest> raw;
            string source;
            if (result.GetValue(trace) is { } file)
            {
                using var reader = file.OpenText();
                raw = ReplayTrace.ReadAzure(reader, file.Name);
                source = file.Name;
            }
            else
            {
                var settings = new TraceGeneratorSettings
                {
                    Requests = result.GetValue(requests),
                    RatePerSecond = result.GetValue(rate),
                    Arrivals = result.GetValue(arrivals),
                    Burstiness = result.GetValue(burstiness),
                    OutputTokens = result.GetValue(outputTokens),
                    Seed = seedValue,
                };
                raw = ReplayTrace.Generate(settings);
                source = string.Create(CultureInfo.InvariantCulture, $"the paper's mix ({settings.Arrivals}, seed {settings.Seed})");
            }
            var requestsToSend = ReplayTrace.Scale(raw, scale, result.GetValue(speedup), Math.Min(result.GetValue(maxOutput), config.MaxPositionEmbeddings / 2), config.MaxPositionEmbeddings);

            // Prompts: windows of held-out Brown text, the same for request i in every mode.
            BrownCorpus brown;
            try
            {
                brown = BrownCorpus.Load(result.GetValue(corpus)?.FullName);
            }
            catch (CorpusNotFoundException e)
            {
                await error.WriteLineAsync($"error: {e.Message}").ConfigureAwait(false);
                return ExitCodes.DataError;
            }
            int[] heldOut;
            using (var tokenizer = TextTokenizer.Load(folder.FullName))
            {
                heldOut = tokenizer.Encode(brown.HeldOutText);
            }
            int[] Prompt(int i) => Cut(heldOut, requestsToSend[i].ContextTokens, seedValue * 7919 + i);

            var (admin, adminChannel) = controller.Connect(result);
            using var _ = adminChannel;
            using var gatewayChannel = GrpcChannel.ForAddress(GatewayAddress(result.GetValue(gateway)!), new GrpcChannelOptions
            {
                // Hundreds of concurrent streams: more than one HTTP/2 connection's stream limit.
                HttpHandler = new SocketsHttpHandler { EnableMultipleHttp2Connections = true },
            });
            var key = result.GetValue(apiKey) ?? Environment.GetEnvironmentVariable("DSLAMESH_API_KEY");
            var generation = new Generation.GenerationClient(gatewayChannel);
            var status = await admin.GetStatusAsync(new GetStatusRequest(), cancellationToken: cancellationToken).ConfigureAwait(false);
            if (status.Services.Count == 0)
            {
                await error.WriteLineAsync("error: the controller knows no model services; start them first (deploy/local/run.sh)").ConfigureAwait(false);
                return ExitCodes.ServiceError;
            }
            var runner = new ReplayRunner(generation, key, admin, TimeProvider.System, TimeSpan.FromMilliseconds(Math.Max(20, result.GetValue(sampleMs))), TimeSpan.FromSeconds(result.GetValue(requestTimeout)));
            var slo = new ServiceLevelObjective(result.GetValue(sloTtft), result.GetValue(sloTpot));
            var setup = new ReplaySetup
            {
                Trace = source,
                Requests = requestsToSend.Count,
                OfferedRatePerSecond = requestsToSend.Count > 1 ? (requestsToSend.Count - 1) / Math.Max(1e-9, requestsToSend[^1].ArrivalSeconds) : 0,
                LengthScale = scale,
                Speedup = result.GetValue(speedup),
                MeanPromptTokens = requestsToSend.Average(r => r.ContextTokens),
                MeanOutputTokens = requestsToSend.Average(r => r.GeneratedTokens),
                Slo = slo,
                Model = folder.Name,
                Services = [.. status.Services.Select(s => s.Id).Order()],
                ClientMachine = $"{Environment.MachineName} ({Environment.ProcessorCount} cores)",
                StartedAt = DateTimeOffset.UtcNow,
            };
            Log(string.Create(CultureInfo.InvariantCulture, $"replaying {setup.Requests} requests ({setup.Trace}) at {setup.OfferedRatePerSecond:F2}/s against {setup.Services.Count} service(s), modes {string.Join(", ", modeList.Select(m => m.Name))}"));

            var benchmark = new ReplayBenchmark(admin, runner, new ReplayBenchmarkSettings(result.GetValue(warmup), TimeSpan.FromSeconds(result.GetValue(settle)), slo, result.GetValue(repeat) is var n and >= 1 ? n : throw new ArgumentException("--repeat must be at least 1.")), Log, WithProgressAsync, TimeProvider.System);
            IReadOnlyList<ModeResult> results;
            try
            {
                await runner.PreflightAsync(Cut(heldOut, 8, seedValue), cancellationToken).ConfigureAwait(false);
                results = await benchmark.RunAsync(modeList, requestsToSend, Prompt, cancellationToken).ConfigureAwait(false);
            }
            catch (Exception e) when (e is InvalidOperationException or TimeoutException)
            {
                await error.WriteLineAsync($"error: {e.Message}").ConfigureAwait(false);
                return ExitCodes.ServiceError;
            }

            if (result.GetValue(pplTokens) is var tokens and > 0)
            {
                var variant = results.SelectMany(r => r.Requests).Select(r => r.Variant).FirstOrDefault(v => v is not null) ?? "dsla-foldable";
                using var loaded = LoadedModel.Load(folder.FullName, new TorchBackendOptions { Device = result.GetValue(device)! });
                if (!loaded.AttachDsla(variant))
                {
                    throw new ArgumentException($"--model: '{folder.FullName}' has no '{variant}' DSLA weights, so the served perplexity cannot be measured (pass --ppl-tokens 0 to skip it).");
                }
                var quality = new ServedQuality(loaded, heldOut, result.GetValue(pplSeqLen), tokens);
                foreach (var mode in results)
                {
                    mode.Summary.ServedPerplexity = quality.Of(mode.Requests, Log);
                }
            }

            var report = new ReplayReport { Setup = setup, Modes = results };
            await output.WriteAsync(report.FormatTable()).ConfigureAwait(false);
            if (result.GetValue(json) is { } jsonFile)
            {
                jsonFile.Directory?.Create();
                await File.WriteAllTextAsync(jsonFile.FullName, JsonSerializer.Serialize(report, ReplayJsonContext.Default.ReplayReport) + "\n", cancellationToken).ConfigureAwait(false);
                Log($"wrote {jsonFile.FullName}");
            }
            if (result.GetValue(png) is { } pngFile)
            {
                Log($"wrote {ReplayPlot.Write(report, pngFile.FullName)}");
            }
            return results.Sum(r => r.Summary.Failed) == 0 ? ExitCodes.Ok : ExitCodes.ServiceError;
        })));
        return command;
    }

    /// <summary>A window of <paramref name="length"/> tokens of the stream (repeated when the stream is shorter).</summary>
    internal static int[] Cut(int[] stream, int length, int seed)
    {
        if (stream.Length == 0)
        {
            throw new ArgumentException("the held-out text tokenized to nothing.");
        }
        var random = new Random(seed);
        var start = random.Next(0, Math.Max(1, stream.Length - length + 1));
        var prompt = new int[length];
        for (var i = 0; i < length; i++)
        {
            prompt[i] = stream[(start + i) % stream.Length];
        }
        return prompt;
    }

    private static List<ReplayMode> ParseModes(string text, FileInfo? adaptiveFile, double lengthScale)
    {
        var adaptive = ReplayModes.ScaledDefault(lengthScale);
        if (adaptiveFile is not null)
        {
            var parsed = PolicyParser.Parse(File.ReadAllText(adaptiveFile.FullName));
            adaptive = parsed.IsValid ? parsed.Policy! : throw new ArgumentException($"--adaptive-policy: {string.Join("; ", parsed.Errors)}");
        }
        var names = text.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries);
        if (names.Length == 0 || names.Distinct().Count() != names.Length)
        {
            throw new ArgumentException("--modes: name each mode once, e.g. attention,adaptive,dsla25,dsla50.");
        }
        return [.. names.Select(n => ReplayModes.Parse(n, adaptive))];
    }

    private static Uri GatewayAddress(string text) =>
        Uri.TryCreate(text, UriKind.Absolute, out var uri) && uri.Scheme is "http" or "https"
            ? uri
            : throw new ArgumentException($"--gateway: '{text}' is not an http:// or https:// URL.");

    /// <summary>A progress bar on an interactive terminal, a line every 10 s otherwise.</summary>
    private static async Task<ReplayRun> WithProgressAsync(string mode, int total, Func<IProgress<ReplayProgress>, Task<ReplayRun>> body, Action<string> log)
    {
        if (AnsiConsole.Profile.Capabilities.Interactive && !Console.IsErrorRedirected && !Console.IsOutputRedirected)
        {
            return await AnsiConsole.Progress()
                .AutoClear(false)
                .Columns(new TaskDescriptionColumn { Alignment = Justify.Left }, new ProgressBarColumn(), new PercentageColumn(), new ElapsedTimeColumn(), new SpinnerColumn())
                .StartAsync(async context =>
                {
                    var task = context.AddTask(Markup.Escape(mode), maxValue: total);
                    return await body(new SynchronousProgress(p =>
                    {
                        task.Value = p.Finished;
                        task.Description = Markup.Escape(Describe(p));
                    })).ConfigureAwait(false);
                }).ConfigureAwait(false);
        }
        var last = DateTime.MinValue;
        return await body(new SynchronousProgress(p =>
        {
            if (DateTime.UtcNow - last >= TimeSpan.FromSeconds(10) || p.Finished == p.Total)
            {
                last = DateTime.UtcNow;
                log(Describe(p));
            }
        })).ConfigureAwait(false);
    }

    private static string Describe(ReplayProgress p) => string.Create(CultureInfo.InvariantCulture,
        $"{p.Mode}: sent {p.Sent}/{p.Total}, finished {p.Finished} ({p.Rejected} rejected, {p.Failed} failed) after {p.Elapsed.TotalSeconds:F0} s");

    /// <summary>Reports on the caller's thread (the built-in Progress posts to a synchronization context).</summary>
    private sealed class SynchronousProgress(Action<ReplayProgress> report) : IProgress<ReplayProgress>
    {
        private readonly Lock _gate = new();

        public void Report(ReplayProgress value)
        {
            lock (_gate)
            {
                report(value);
            }
        }
    }
}

using System.CommandLine;
using DslaMesh.Engine.Inference;

namespace DslaMesh.Cli.Commands;

/// <summary>
/// <c>dslactl generate</c>: stream a completion from an in-process model (<c>--model</c>), a model service or gateway over
/// gRPC (<c>--endpoint</c>), or any OpenAI-compatible HTTP server with SSE (<c>--http</c>).
/// </summary>
public static class GenerateCommand
{
    /// <summary>Builds the command.</summary>
    public static Command Create()
    {
        var engine = new EngineOptions(modelRequired: false);
        var endpoint = new Option<string?>("--endpoint") { Description = "Stream over gRPC from a model service or gateway, e.g. http://127.0.0.1:5101." };
        var http = new Option<string?>("--http") { Description = "Stream over the OpenAI HTTP API (SSE), e.g. http://127.0.0.1:5100." };
        var fidelity = new Option<string?>("--fidelity") { Description = "Remote only: exact, balanced or fast." };
        fidelity.AcceptOnlyFromAmong("exact", "balanced", "fast");
        var prompt = new Option<string?>("--prompt", "-p") { Description = "Prompt text." };
        var ids = new Option<string?>("--ids") { Description = "Prompt as comma-separated token ids (instead of --prompt)." };
        var greedy = new Option<bool>("--greedy") { Description = "Always take the most likely token." };
        var temperature = new Option<double>("--temperature") { Description = "Sampling temperature (0 = greedy).", DefaultValueFactory = _ => 1.0 };
        var topP = new Option<double>("--top-p") { Description = "Nucleus sampling mass in (0, 1].", DefaultValueFactory = _ => 1.0 };
        var topK = new Option<int>("--top-k") { Description = "Sample from the k most likely tokens (0 = off)." };
        var repetition = new Option<double>("--repetition-penalty") { Description = "Penalty for tokens already present (1 = off).", DefaultValueFactory = _ => 1.0 };
        var seed = new Option<long?>("--seed") { Description = "Random seed for reproducible sampling." };
        var maxTokens = new Option<int>("--max-tokens", "-n") { Description = "Most tokens to generate.", DefaultValueFactory = _ => 64 };
        var stop = new Option<string[]>("--stop") { Description = "Stop when this text appears (repeatable).", AllowMultipleArgumentsPerToken = false };
        var logprobs = new Option<bool>("--logprobs") { Description = "Print each token's id and log-probability to stderr." };
        var dsla = new Option<string?>("--dsla-layers") { Description = "Comma-separated layers to run as DSLA (needs DSLA weights beside the model)." };

        var command = new Command("generate", "Stream a completion: in-process from a model folder (--model), over gRPC (--endpoint) or over OpenAI HTTP with SSE (--http).");
        engine.AddTo(command);
        foreach (var option in new Option[] { endpoint, http, fidelity, prompt, ids, greedy, temperature, topP, topK, repetition, seed, maxTokens, stop, logprobs, dsla })
        {
            command.Options.Add(option);
        }
        command.Validators.Add(result =>
        {
            if ((result.GetValue(prompt) is null) == (result.GetValue(ids) is null))
            {
                result.AddError("Give exactly one of --prompt or --ids.");
            }
            var targets = new[] { result.GetResult(engine.Model) is not null, result.GetValue(endpoint) is not null, result.GetValue(http) is not null }.Count(t => t);
            if (targets != 1)
            {
                result.AddError("Give exactly one of --model (in-process), --endpoint (gRPC) or --http (OpenAI HTTP).");
            }
            if (result.GetResult(engine.Model) is null && result.GetValue(dsla) is not null)
            {
                result.AddError("--dsla-layers works only in-process (--model); remote services convert layers through the controller.");
            }
        });
        command.SetAction((result, cancellationToken) => EngineOptions.GuardAsync(async () =>
        {
            var parameters = new SamplingParameters
            {
                Temperature = result.GetValue(greedy) ? 0 : result.GetValue(temperature),
                TopP = result.GetValue(topP),
                TopK = result.GetValue(topK),
                RepetitionPenalty = result.GetValue(repetition),
                Seed = result.GetValue(seed),
                MaxTokens = result.GetValue(maxTokens),
                StopSequences = result.GetValue(stop) ?? [],
                LogProbs = result.GetValue(logprobs),
            };
            parameters.EnsureValid();
            if (result.GetValue(endpoint) is { } grpcAddress)
            {
                return await RemoteGeneration.GrpcAsync(result, grpcAddress, parameters, result.GetValue(prompt), result.GetValue(ids), result.GetValue(fidelity), cancellationToken).ConfigureAwait(false);
            }
            if (result.GetValue(http) is { } httpAddress)
            {
                return await RemoteGeneration.HttpAsync(result, httpAddress, parameters, result.GetValue(prompt), result.GetValue(ids), result.GetValue(fidelity), cancellationToken).ConfigureAwait(false);
            }
            using var loaded = engine.Load(result);
            int[] promptIds;
            if (result.GetValue(prompt) is { } text)
            {
                if (text.Length == 0)
                {
                    throw new ArgumentException("--prompt is empty.");
                }
                promptIds = loaded.RequireTokenizer().Encode(text);
            }
            else
            {
                promptIds = EngineOptions.ParseIds(result.GetValue(ids)!);
            }
            var layers = ParseLayerMix(result.GetValue(dsla), loaded.Model.Config.NumHiddenLayers);
            var generator = new TextGenerator(loaded.Model, loaded.Tokenizer);
            FinishReason? finish = null;
            foreach (var token in generator.Generate(promptIds, parameters, layers, cancellationToken))
            {
                await Console.Out.WriteAsync(loaded.Tokenizer is null ? $"{token.Id} " : token.Text).ConfigureAwait(false);
                await Console.Out.FlushAsync(cancellationToken).ConfigureAwait(false);
                if (parameters.LogProbs)
                {
                    await Console.Error.WriteLineAsync($"token {token.Id} logprob {token.LogProb:F4}").ConfigureAwait(false);
                }
                finish = token.Finish;
            }
            await Console.Out.WriteLineAsync().ConfigureAwait(false);
            await Console.Error.WriteLineAsync($"[finish: {finish?.ToString().ToLowerInvariant()}]").ConfigureAwait(false);
            return finish == FinishReason.Cancelled ? ExitCodes.Cancelled : ExitCodes.Ok;
        }));
        return command;
    }

    private static bool[]? ParseLayerMix(string? text, int layers)
    {
        if (string.IsNullOrWhiteSpace(text))
        {
            return null;
        }
        var mix = new bool[layers];
        foreach (var id in EngineOptions.ParseIds(text))
        {
            if (id >= layers)
            {
                throw new ArgumentException($"--dsla-layers: layer {id} does not exist (the model has {layers}).");
            }
            mix[id] = true;
        }
        return mix;
    }
}

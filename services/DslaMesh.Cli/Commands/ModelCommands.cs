using System.CommandLine;
using System.Text.Json;
using DslaMesh.Engine.Models;
using static TorchSharp.torch;

namespace DslaMesh.Cli.Commands;

/// <summary><c>dslactl model …</c>: inspect a checkpoint with the in-process engine.</summary>
public static class ModelCommands
{
    /// <summary>Builds <c>model</c> and its subcommands.</summary>
    public static Command Create()
    {
        var model = new Command("model", "Inspect a model checkpoint.");
        model.Subcommands.Add(CreateLogits());
        return model;
    }

    private static Command CreateLogits()
    {
        var engine = new EngineOptions();
        var ids = new Option<string>("--ids") { Description = "Comma-separated token ids, e.g. 1,2,3.", Required = true };
        var command = new Command("logits", "Print the logits of every position as JSON: {\"logits\": [[...], ...]}.");
        engine.AddTo(command);
        command.Options.Add(ids);
        command.SetAction((result, cancellationToken) => EngineOptions.GuardAsync(async () =>
        {
            var tokens = EngineOptions.ParseIds(result.GetValue(ids)!);
            using var loaded = engine.Load(result);
            var vocab = loaded.Model.Config.VocabSize;
            if (tokens.FirstOrDefault(t => t >= vocab, -1) is var bad and >= 0)
            {
                throw new ArgumentException($"--ids: token id {bad} is outside the vocabulary (0..{vocab - 1}).");
            }
            if (tokens.Length > loaded.Model.ContextLength)
            {
                throw new ContextLengthException(tokens.Length, loaded.Model.ContextLength);
            }
            float[] flat;
            using (NewDisposeScope())
            using (inference_mode())
            {
                var input = tensor(tokens.Select(t => (long)t).ToArray(), device: loaded.Model.Device).unsqueeze(0);
                flat = loaded.Model.Forward(input)[0].to(ScalarType.Float32).cpu().data<float>().ToArray();
            }
            await using var stdout = Console.OpenStandardOutput();
            await using var writer = new Utf8JsonWriter(stdout);
            writer.WriteStartObject();
            writer.WriteStartArray("logits");
            for (var row = 0; row < tokens.Length; row++)
            {
                writer.WriteStartArray();
                for (var v = 0; v < vocab; v++)
                {
                    writer.WriteNumberValue(flat[(row * vocab) + v]);
                }
                writer.WriteEndArray();
            }
            writer.WriteEndArray();
            writer.WriteEndObject();
            await writer.FlushAsync(cancellationToken).ConfigureAwait(false);
            await stdout.WriteAsync("\n"u8.ToArray(), cancellationToken).ConfigureAwait(false);
            return ExitCodes.Ok;
        }));
        return command;
    }
}

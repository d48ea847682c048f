using System.CommandLine;
using System.Text.Json;
using DslaMesh.Engine.Backends;
using DslaMesh.Engine.Dsla;
using DslaMesh.Engine.Models;
using DslaMesh.Engine.Training;
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
        model.Subcommands.Add(CreateRandom());
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

    /// <summary>
    /// <c>model random</c>: a servable model folder with random weights and random DSLA layers, for speed measurements
    /// of shapes no checkpoint here has (the Llama-2-7B shape): config.json, model.safetensors (fp16),
    /// dsla/&lt;variant&gt;.safetensors with a manifest converting the last layer first, and a tokenizer.
    /// </summary>
    private static Command CreateRandom()
    {
        var output = new Option<DirectoryInfo>("--out", "-o") { Description = "Folder to write (must not exist or be empty).", Required = true };
        var shape = new Option<string>("--shape") { Description = "7b (Llama-2-7B: 32 × 4096, 32 heads, MLP 11008, vocab 32000) or brown (the default model's).", DefaultValueFactory = _ => "7b" };
        var layers = new Option<int?>("--layers") { Description = "Override the shape's layer count." };
        var context = new Option<int>("--context") { Description = "max_position_embeddings (at least the shape's own: 4096 for 7b, 2048 for brown).", DefaultValueFactory = _ => 16384 };
        var tokenizer = new Option<FileInfo>("--tokenizer") { Description = "tokenizer.json to copy in (its ids must fit the vocabulary, e.g. models/brown-8l/tokenizer.json).", Required = true };
        var variant = new Option<string>("--variant") { Description = "DSLA variant of the random layers.", DefaultValueFactory = _ => "dsla-foldable" };
        var seed = new Option<long>("--seed") { Description = "Seed of the weights.", DefaultValueFactory = _ => 1234 };
        var device = new Option<string>("--device") { Description = "Where the weights are drawn: cpu or cuda (faster for 7b).", DefaultValueFactory = _ => "cpu" };
        var command = new Command("random", "Write a servable model folder with random weights and random DSLA layers (speed measurements only).");
        foreach (var option in new Option[] { output, shape, layers, context, tokenizer, variant, seed, device })
        {
            command.Options.Add(option);
        }
        command.SetAction((result, cancellationToken) => EngineOptions.GuardAsync(async () =>
        {
            var folder = result.GetValue(output)!;
            if (folder.Exists && folder.EnumerateFileSystemInfos().Any())
            {
                throw new ArgumentException($"--out: '{folder.FullName}' is not empty.");
            }
            var source = result.GetValue(tokenizer)!;
            if (!source.Exists)
            {
                throw new ArgumentException($"--tokenizer: '{source.FullName}' does not exist.");
            }
            var config = ServeBenchCommand.RandomShape(result.GetValue(shape)!, result.GetValue(layers), result.GetValue(context));
            var variantName = result.GetValue(variant)!;
            var parsed = DslaVariants.Parse(variantName);
            var torchDevice = TorchRuntime.Initialize(new TorchBackendOptions { Device = result.GetValue(device)!, DType = "float16" });
            folder.Create();
            var weightsSeed = result.GetValue(seed);
            using (var model = new LlamaForCausalLM(config, ScalarType.Float16, torchDevice))
            {
                model.InitializeRandom(weightsSeed);
                ModelExport.WriteWeights(Path.Combine(folder.FullName, "model.safetensors"), model.CheckpointTensors());
                var all = Enumerable.Range(0, config.NumHiddenLayers).ToArray();
                using var dsla = DslaLayerSet.Create(model, parsed, all, weightsSeed + 1);
                Directory.CreateDirectory(Path.Combine(folder.FullName, DslaManifest.FolderName));
                var file = $"{DslaVariants.Name(parsed)}.safetensors";
                dsla.Save(Path.Combine(folder.FullName, DslaManifest.FolderName, file), ScalarType.Float16);
                new DslaManifest
                {
                    Order = [.. all.Reverse()],
                    Variants = { [DslaVariants.Name(parsed)] = new DslaVariantEntry { File = file, Layers = [.. all] } },
                }.Save(folder.FullName);
            }
            ModelExport.WriteConfig(Path.Combine(folder.FullName, "config.json"), config);
            ModelExport.WriteGenerationConfig(Path.Combine(folder.FullName, "generation_config.json"), config);
            source.CopyTo(Path.Combine(folder.FullName, "tokenizer.json"));
            await Console.Out.WriteLineAsync($"wrote {folder.FullName}: {config.NumHiddenLayers} layers × {config.HiddenSize}, random weights and random {variantName} layers (speed measurements only)").ConfigureAwait(false);
            return ExitCodes.Ok;
        }));
        return command;
    }
}

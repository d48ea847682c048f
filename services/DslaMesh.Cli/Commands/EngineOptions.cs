using System.CommandLine;
using DslaMesh.Engine.Backends;
using DslaMesh.Engine.Inference;
using DslaMesh.Engine.Models;

namespace DslaMesh.Cli.Commands;

/// <summary>Options shared by every command that loads a model in-process.</summary>
public sealed class EngineOptions
{
    /// <summary>Options for a command that always loads a model in-process.</summary>
    public EngineOptions()
        : this(modelRequired: true)
    {
    }

    /// <summary>Options for a command where the model folder is one choice among others.</summary>
    public EngineOptions(bool modelRequired) => Model = new("--model", "-m") { Description = "Model folder (config.json, safetensors, tokenizer.json).", Required = modelRequired };

    public Option<DirectoryInfo> Model { get; }
    public Option<string> Device { get; } = new("--device") { Description = "cpu, cuda or cuda:N.", DefaultValueFactory = _ => "cpu" };
    public Option<string?> DType { get; } = new("--dtype") { Description = "float32, bfloat16 or float16 (default: float32 on CPU, bfloat16 on CUDA)." };
    public Option<DirectoryInfo?> LibTorch { get; } = new("--libtorch") { Description = "CUDA LibTorch folder (default: ask python3 where torch lives)." };
    public Option<bool> NormIntoProjections { get; } = new("--norm-into-projections") { Description = "CUDA: apply decode steps' RMS norms inside the projections' GEMV launches (TorchBackend:NormIntoProjections)." };

    /// <summary>Adds the options to a command.</summary>
    public void AddTo(Command command)
    {
        command.Options.Add(Model);
        command.Options.Add(Device);
        command.Options.Add(DType);
        command.Options.Add(LibTorch);
        command.Options.Add(NormIntoProjections);
    }

    /// <summary>The backend options a parse result asks for.</summary>
    public TorchBackendOptions Backend(ParseResult result) => new()
    {
        Device = result.GetValue(Device) ?? "cpu",
        DType = result.GetValue(DType),
        LibTorchDirectory = result.GetValue(LibTorch)?.FullName,
        NormIntoProjections = result.GetValue(NormIntoProjections),
    };

    /// <summary>Loads the model the parse result names.</summary>
    public LoadedModel Load(ParseResult result, int? maxPositions = null)
    {
        var backend = Backend(result);
        var problems = new List<System.ComponentModel.DataAnnotations.ValidationResult>();
        if (!System.ComponentModel.DataAnnotations.Validator.TryValidateObject(backend, new(backend), problems, validateAllProperties: true))
        {
            throw new ArgumentException(string.Join("; ", problems.Select(p => p.ErrorMessage)));
        }
        return LoadedModel.Load(result.GetValue(Model)!.FullName, backend, maxPositions);
    }

    /// <summary>Runs a command body, turning expected failures into a message on stderr and an exit code.</summary>
    public static async Task<int> GuardAsync(Func<Task<int>> body)
    {
        try
        {
            return await body().ConfigureAwait(false);
        }
        catch (ModelLoadException e)
        {
            await Console.Error.WriteLineAsync($"error: {e.Message}").ConfigureAwait(false);
            return ExitCodes.ModelError;
        }
        catch (Exception e) when (e is ArgumentException or ContextLengthException or FormatException or InvalidSamplingException)
        {
            await Console.Error.WriteLineAsync($"error: {e.Message}").ConfigureAwait(false);
            return ExitCodes.InvalidInput;
        }
        catch (OperationCanceledException)
        {
            return ExitCodes.Cancelled;
        }
    }

    /// <summary>Parses "1,2,3" into token ids.</summary>
    public static int[] ParseIds(string text)
    {
        var parts = text.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries);
        if (parts.Length == 0)
        {
            throw new ArgumentException("--ids: give at least one token id, e.g. --ids 1,2,3.");
        }
        return parts.Select(p => int.TryParse(p, System.Globalization.NumberStyles.Integer, System.Globalization.CultureInfo.InvariantCulture, out var id) && id >= 0
            ? id
            : throw new ArgumentException($"--ids: '{p}' is not a non-negative integer.")).ToArray();
    }
}

using DslaMesh.Cli.Commands;
using DslaMesh.Engine.Backends;
using DslaMesh.Engine.Models;
using DslaMesh.Tests.Common;

namespace DslaMesh.Cli.Tests;

/// <summary><c>dslactl model random</c>: a folder the engine loads, with DSLA layers it converts to.</summary>
[Collection(ConsoleCollection.Name)]
public sealed class RandomModelCommandTests : IDisposable
{
    private readonly string _root = Directory.CreateTempSubdirectory("dslamesh-random-").FullName;

    public void Dispose() => Directory.Delete(_root, recursive: true);

    [Fact]
    public async Task Random_model_folder_loads_with_its_dsla_layers_and_a_used_folder_is_refused()
    {
        var folder = Path.Combine(_root, "model");
        var tokenizer = Path.Combine(RepoPaths.Root, "models", "brown-8l", "tokenizer.json");
        var (code, output, error) = await RunAsync(["model", "random", "--out", folder, "--shape", "brown", "--layers", "3", "--context", "3000", "--tokenizer", tokenizer]);
        Assert.True(code == 0, error + output);

        using var loaded = LoadedModel.Load(folder, new TorchBackendOptions { Device = "cpu" });
        Assert.Equal(3, loaded.Model.Config.NumHiddenLayers);
        Assert.Equal(3000, loaded.Model.ContextLength);
        Assert.NotNull(loaded.Tokenizer);
        Assert.True(loaded.AttachDsla("dsla-foldable"));
        Assert.Equal([2, 1, 0], loaded.ConversionOrder);
        Assert.Equal(3, loaded.Dsla!.Layers.Count);

        (code, _, error) = await RunAsync(["model", "random", "--out", folder, "--shape", "brown", "--tokenizer", tokenizer]);
        Assert.Equal(ExitCodes.InvalidInput, code);
        Assert.Contains("is not empty", error);
    }

    private static Task<(int Code, string Output, string Error)> RunAsync(string[] args) => ConsoleCapture.DslactlAsync(args);
}

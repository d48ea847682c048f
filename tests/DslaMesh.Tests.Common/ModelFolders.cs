using DslaMesh.Engine.Backends;
using DslaMesh.Engine.Dsla;
using DslaMesh.Engine.Models;
using static TorchSharp.torch;

namespace DslaMesh.Tests.Common;

/// <summary>Temporary model folders for service tests.</summary>
public static class ModelFolders
{
    /// <summary>
    /// Copies a Llama fixture into a temporary folder and adds foldable DSLA weights for every layer (initialised from
    /// the teacher, seeded) with a manifest whose conversion order is the given one (default: last layer first).
    /// </summary>
    public static string WithFoldableDsla(string fixture = "llama-gqa-untied", long seed = 3, int[]? order = null)
    {
        var source = RepoPaths.LlamaFixture(fixture);
        var folder = Directory.CreateTempSubdirectory("dslamesh-model-").FullName;
        foreach (var file in Directory.GetFiles(source))
        {
            File.Copy(file, Path.Combine(folder, Path.GetFileName(file)));
        }
        AddFoldableDsla(folder, seed, order);
        return folder;
    }

    /// <summary>
    /// Adds foldable DSLA weights for every layer of the model in <paramref name="folder"/> (initialised from the
    /// teacher, seeded) with a manifest whose conversion order is the given one (default: last layer first).
    /// </summary>
    public static void AddFoldableDsla(string folder, long seed = 3, int[]? order = null)
    {
        var device = TorchRuntime.EnsureCpu();
        using var model = LlamaForCausalLM.Load(folder, ScalarType.Float32, device);
        var layers = Enumerable.Range(0, model.Config.NumHiddenLayers).ToArray();
        using var set = DslaLayerSet.Create(model, DslaVariant.DslaFoldable, layers, seed);
        Directory.CreateDirectory(Path.Combine(folder, DslaManifest.FolderName));
        set.Save(Path.Combine(folder, DslaManifest.FolderName, "dsla-foldable.safetensors"));
        new DslaManifest
        {
            Order = [.. order ?? layers.Reverse()],
            Variants = { ["dsla-foldable"] = new DslaVariantEntry { File = "dsla-foldable.safetensors", Layers = [.. layers] } },
        }.Save(folder);
    }
}

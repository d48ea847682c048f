using System.Globalization;
using System.Text;
using DslaMesh.Engine.Backends;
using DslaMesh.Engine.Data;
using DslaMesh.Engine.Models;
using DslaMesh.Engine.Tokenization;
using DslaMesh.Engine.Training;
using static TorchSharp.torch;

namespace DslaMesh.Tests.Common;

/// <summary>
/// Small stand-ins for the distillation pipeline's inputs: a Brown-corpus-shaped folder of synthetic tagged documents
/// (500 files and cats.txt, so <see cref="BrownCorpus.Load"/> and its fixed split work on it), and tiny random teacher
/// folders with a BPE tokenizer trained on that text.
/// </summary>
public static class TinyTeachers
{
    private static readonly string[] Subjects = ["The jury", "The city", "A committee", "The county", "Mr. Jones", "The new law", "Each member", "The report"];
    private static readonly string[] Verbs = ["said", "found", "believed", "recommended", "reported", "argued", "noted", "decided"];
    private static readonly string[] Objects =
    [
        "that the election was fair", "that the budget was too small", "the plan for the new school", "a change in the tax rate",
        "that many laws are outmoded", "the purchase of new equipment", "a study of the highway program", "the need for more clerks",
    ];

    /// <summary>
    /// Writes 500 synthetic documents in Brown Form C (tagged words, one sentence per line, blank-line paragraphs) and a
    /// cats.txt into a new temporary folder, and returns it. Deterministic.
    /// </summary>
    public static string SyntheticBrown()
    {
        var folder = Directory.CreateTempSubdirectory("dslamesh-brown-").FullName;
        var ids = Enumerable.Range(0, 18).SelectMany(g => Enumerable.Range(1, 30).Select(n => string.Create(CultureInfo.InvariantCulture, $"c{(char)('a' + g)}{n:00}")))
            .Take(BrownCorpus.DocumentCount).ToArray();
        var random = new SplitMix64(17);
        var cats = new StringBuilder();
        foreach (var id in ids)
        {
            cats.Append(id).Append(' ').Append(id[1] switch { 'a' => "news", 'b' => "editorial", _ => "fiction" }).Append('\n');
            var text = new StringBuilder();
            for (var paragraph = 0; paragraph < 3; paragraph++)
            {
                for (var sentence = 0; sentence < 4; sentence++)
                {
                    var words = $"{Subjects[random.NextBelow((ulong)Subjects.Length)]} {Verbs[random.NextBelow((ulong)Verbs.Length)]} {Objects[random.NextBelow((ulong)Objects.Length)]} in {1950 + (int)random.NextBelow(20)}";
                    text.Append(string.Join(' ', words.Split(' ').Select(w => w + "/nn"))).Append(" ./.\n");
                }
                text.Append('\n');
            }
            File.WriteAllText(Path.Combine(folder, id), text.ToString());
        }
        File.WriteAllText(Path.Combine(folder, "cats.txt"), cats.ToString());
        return folder;
    }

    /// <summary>
    /// A tiny random Llama teacher folder (config.json, model.safetensors, tokenizer.json, generation_config.json) in a new
    /// temporary folder: hidden 32, 2 heads × 16 (1 KV head), MLP 64, <paramref name="layers"/> layers,
    /// <paramref name="context"/> positions, tied embeddings, a 320-token byte-level BPE trained on the training documents of
    /// <paramref name="brownFolder"/>, weights N(0, 0.2²) from <paramref name="seed"/>.
    /// </summary>
    public static string Create(string brownFolder, int layers = 3, int context = 512, long seed = 1)
    {
        var folder = Directory.CreateTempSubdirectory("dslamesh-teacher-").FullName;
        var corpus = BrownCorpus.Load(brownFolder);
        new BpeTrainer(320).Train(corpus.Train.Select(d => d.Text)).WriteTokenizerJson(Path.Combine(folder, "tokenizer.json"));
        var info = TokenizerInfo.Read(Path.Combine(folder, "tokenizer.json"));
        var config = new TrainingRecipe { Layers = layers, HiddenSize = 32, Heads = 2, KvHeads = 1, IntermediateSize = 64, Context = context }
            .ToConfig(info.VocabSize) with { BosTokenId = info.BosId, EosTokenIds = [info.EosId], RmsNormEps = 1e-5 };
        var device = TorchRuntime.EnsureCpu();
        using (var model = new LlamaForCausalLM(config, ScalarType.Float32, device))
        {
            model.InitializeRandom(seed, std: 0.2);
            ModelExport.WriteWeights(Path.Combine(folder, "model.safetensors"), model.CheckpointTensors());
        }
        ModelExport.WriteConfig(Path.Combine(folder, "config.json"), config);
        ModelExport.WriteGenerationConfig(Path.Combine(folder, "generation_config.json"), config);
        return folder;
    }

    /// <summary>A copy of a model folder (files only) in a new temporary folder.</summary>
    public static string Copy(string folder)
    {
        var copy = Directory.CreateTempSubdirectory("dslamesh-teacher-").FullName;
        foreach (var file in Directory.GetFiles(folder))
        {
            File.Copy(file, Path.Combine(copy, Path.GetFileName(file)));
        }
        return copy;
    }
}

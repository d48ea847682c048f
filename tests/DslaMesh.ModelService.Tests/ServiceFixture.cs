using DslaMesh.Engine.Backends;
using DslaMesh.Engine.Inference;
using DslaMesh.Engine.Models;
using DslaMesh.Engine.Tokenization;
using DslaMesh.Tests.Common;
using static TorchSharp.torch;

namespace DslaMesh.ModelService.Tests;

/// <summary>A real Redis server and a model folder with foldable DSLA weights, shared by a test class.</summary>
public sealed class ServiceFixture : IAsyncLifetime
{
    private readonly Lock _gate = new();

    public RedisServer Redis { get; private set; } = null!;
    public string ModelPath { get; } = ModelFolders.WithFoldableDsla();

    public async ValueTask InitializeAsync() => Redis = await RedisServer.StartAsync();

    /// <summary>Greedy or seeded tokens from the engine alone (no service), optionally with one layer folded to DSLA at a position.</summary>
    public List<int> Reference(IReadOnlyList<int> prompt, SamplingParameters sampling, int? layer = null, int? foldAt = null)
    {
        lock (_gate)
        {
            using var loaded = LoadedModel.Load(ModelPath, new TorchBackendOptions());
            loaded.AttachDsla("dsla-foldable");
            using var scope = NewDisposeScope();
            using var mode = inference_mode();
            using var cache = new SequenceCache(loaded.Model.Config.NumHiddenLayers);
            using var stream = new TokenStream(sampling, prompt, loaded.Model.Config.EosTokenIds, null);
            var mix = new bool[loaded.Model.Config.NumHiddenLayers];
            if (layer is { } l && foldAt == 0)
            {
                mix[l] = true;
            }
            var input = prompt.Select(t => (long)t).ToArray();
            var tokens = new List<int>();
            while (true)
            {
                if (layer is { } f && foldAt is > 0 && cache.Length == foldAt && !mix[f])
                {
                    loaded.Dsla!.Fold([cache], f);
                    mix[f] = true;
                }
                var logits = loaded.Model.Forward(tensor(input).unsqueeze(0), [cache], mix, lastPositionOnly: true);
                var (token, logProb) = stream.Sample(logits[0, 0]);
                var accepted = stream.Accept(token, logProb);
                tokens.Add(token);
                if (accepted.Finish is not null)
                {
                    return tokens;
                }
                input = [token];
            }
        }
    }

    /// <summary>The fixture's tokenizer.</summary>
    public TextTokenizer Tokenizer() => TextTokenizer.Load(ModelPath);

    public async ValueTask DisposeAsync()
    {
        await Redis.DisposeAsync();
        Directory.Delete(ModelPath, recursive: true);
    }
}

using System.CommandLine;
using System.Globalization;
using DslaMesh.Engine.Distillation;
using DslaMesh.Engine.Dsla;
using DslaMesh.Engine.Models;

namespace DslaMesh.Cli.Commands;

/// <summary>
/// <c>dslactl sensitivity</c>: each layer's last-token attention entropy on held-out Brown windows and the conversion
/// order it implies (lowest entropy first); <c>--write</c> stores both in <c>dsla/manifest.json</c>.
/// </summary>
public static class SensitivityCommand
{
    /// <summary>Default windows averaged over.</summary>
    public const int DefaultSamples = 16;

    /// <summary>Default tokens per window (clipped to the model's context).</summary>
    public const int DefaultSeqLen = 1024;

    /// <summary>Builds the command.</summary>
    public static Command Create()
    {
        var engine = new EngineOptions();
        var data = DistillationData.CreateOption();
        var samples = new Option<int>("--samples") { Description = "Held-out windows to average over (spread evenly over the held-out text).", DefaultValueFactory = _ => DefaultSamples };
        var seqLen = new Option<int>("--seq-len") { Description = "Tokens per window (clipped to the model's context); the last token's attention is measured.", DefaultValueFactory = _ => DefaultSeqLen };
        var batch = new Option<int>("--batch") { Description = "Windows per forward pass.", DefaultValueFactory = _ => 4 };
        var output = new Option<string>("--output") { Description = "table or json.", DefaultValueFactory = _ => "table" };
        output.AcceptOnlyFromAmong("table", "json");
        var write = new Option<bool>("--write") { Description = "Write the order and entropies into dsla/manifest.json beside the model." };
        var force = new Option<bool>("--force") { Description = "With --write: replace an order that distilled variants were chained in." };
        var command = new Command("sensitivity", "Measure each layer's attention entropy (the paper's sensitivity) and the conversion order, lowest entropy first.");
        engine.AddTo(command);
        foreach (var option in new Option[] { data, samples, seqLen, batch, output, write, force })
        {
            command.Options.Add(option);
        }
        command.SetAction((result, cancellationToken) => TrainCommand.GuardAsync(() => Task.Run(() =>
        {
            using var loaded = engine.Load(result);
            var streams = DistillationData.Load(result.GetValue(data)?.FullName, loaded, train: false, filler: false);
            var measured = Measure(loaded, streams.HeldOut, result.GetValue(samples), result.GetValue(seqLen), result.GetValue(batch));
            var report = new SensitivityReport
            {
                Model = loaded.Directory,
                Samples = measured.Samples,
                SeqLen = measured.SeqLen,
                Entropy = [.. measured.Entropy],
                Order = [.. measured.Order],
            };
            if (result.GetValue(write))
            {
                WriteOrder(loaded.Directory, measured, result.GetValue(force));
                report.Written = true;
            }
            if (result.GetValue(output) == "json")
            {
                Console.WriteLine(DistillationJson.Serialize(report));
            }
            else
            {
                Console.WriteLine(FormatTable(report));
                if (report.Written)
                {
                    Console.WriteLine($"Written to {DslaManifest.PathFor(loaded.Directory)}.");
                }
            }
            return ExitCodes.Ok;
        }, cancellationToken)));
        return command;
    }

    /// <summary>Measures the sensitivity of a loaded model on held-out windows.</summary>
    internal static SensitivityResult Measure(LoadedModel loaded, int[] heldOut, int samples, int seqLen, int batch)
    {
        if (samples < 1 || seqLen < 2 || batch < 1)
        {
            throw new ArgumentException("--samples and --batch must be positive and --seq-len at least 2.");
        }
        var length = Math.Min(seqLen, loaded.Model.ContextLength);
        var windows = LayerSensitivity.EvenlySpacedWindows(heldOut, samples, length);
        return LayerSensitivity.Measure(loaded.Model, windows, batch);
    }

    /// <summary>
    /// Stores the order and entropies in the manifest. A variant distilled in another order was chained in that order, so
    /// replacing the manifest's order would make serving convert layers the chain was not trained for; that needs
    /// <paramref name="force"/>.
    /// </summary>
    internal static void WriteOrder(string modelDirectory, SensitivityResult measured, bool force)
    {
        var manifest = DslaManifest.TryLoad(modelDirectory) ?? new DslaManifest();
        var conflicts = manifest.Variants
            .Where(v => v.Value.Order is { Count: > 0 } chain && !measured.Order.Take(chain.Count).SequenceEqual(chain))
            .Select(v => $"{v.Key} [{string.Join(", ", v.Value.Order!)}]")
            .ToList();
        if (conflicts.Count > 0 && !force)
        {
            throw new ArgumentException(
                $"The new order [{string.Join(", ", measured.Order)}] differs from the order these variants were distilled in: {string.Join("; ", conflicts)}. " +
                "Serving converts layers in the manifest's order, so re-distil them after changing it, or pass --force.");
        }
        manifest.Order = [.. measured.Order];
        manifest.Entropy = [.. measured.Entropy];
        manifest.Save(modelDirectory);
    }

    internal static string FormatTable(SensitivityReport report)
    {
        var lines = new List<string>
        {
            string.Create(CultureInfo.InvariantCulture, $"Last-token attention entropy (nats), mean over heads and {report.Samples} held-out windows of {report.SeqLen} tokens:"),
            "layer  entropy  rank",
        };
        for (var layer = 0; layer < report.Entropy.Count; layer++)
        {
            var rank = report.Order.IndexOf(layer) + 1;
            lines.Add(string.Create(CultureInfo.InvariantCulture, $"{layer,5}  {report.Entropy[layer],7:F4}  {rank,4}"));
        }
        lines.Add($"Conversion order (lowest entropy first): {string.Join(", ", report.Order)}");
        return string.Join(Environment.NewLine, lines);
    }
}

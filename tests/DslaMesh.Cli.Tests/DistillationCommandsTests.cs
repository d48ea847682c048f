using System.Text.Json;
using DslaMesh.Engine.Dsla;
using DslaMesh.Tests.Common;

namespace DslaMesh.Cli.Tests;

/// <summary>
/// sensitivity → distill → eval through the real dslactl command tree, on a tiny random teacher and a synthetic
/// Brown-shaped corpus. The commands write to the console, so this class captures it (in the console collection).
/// </summary>
[Collection(ConsoleCollection.Name)]
public sealed class DistillationCommandsTests : IDisposable
{
    private readonly string _brown = TinyTeachers.SyntheticBrown();
    private readonly string _model;
    private readonly string _out = Directory.CreateTempSubdirectory("dslamesh-eval-").FullName;

    public DistillationCommandsTests() => _model = TinyTeachers.Create(_brown, layers: 4, context: 256);

    public void Dispose()
    {
        foreach (var folder in new[] { _brown, _model, _out })
        {
            Directory.Delete(folder, recursive: true);
        }
    }

    private static Task<(int Code, string Output, string Error)> RunAsync(params string[] args) => ConsoleCapture.DslactlAsync(args);

    [Fact]
    public async Task Sensitivity_distill_and_eval_run_end_to_end()
    {
        // sensitivity: JSON on stdout, order ascending in entropy, written to the manifest.
        var (code, output, error) = await RunAsync("sensitivity", "--model", _model, "--data", _brown, "--samples", "4", "--seq-len", "64", "--write", "--output", "json");
        Assert.True(code == 0, error);
        using (var json = JsonDocument.Parse(output))
        {
            var entropy = json.RootElement.GetProperty("entropy").EnumerateArray().Select(e => e.GetDouble()).ToArray();
            var order = json.RootElement.GetProperty("order").EnumerateArray().Select(e => e.GetInt32()).ToArray();
            Assert.Equal(4, entropy.Length);
            Assert.Equal([0, 1, 2, 3], order.Order());
            Assert.Equal(order.OrderBy(l => entropy[l]), order);
            Assert.True(json.RootElement.GetProperty("written").GetBoolean());
            Assert.Equal(order, DslaManifest.TryLoad(_model)!.Order);
        }
        (code, output, _) = await RunAsync("sensitivity", "--model", _model, "--data", _brown, "--samples", "4", "--seq-len", "64");
        Assert.Equal(0, code);
        Assert.Contains("Conversion order (lowest entropy first):", output, StringComparison.Ordinal);

        // distill all three variants, a few steps each, stored as float16.
        (code, output, error) = await RunAsync("distill", "--model", _model, "--data", _brown, "--variant", "all", "--steps-per-layer", "3", "--seq-len", "32",
            "--batch", "2", "--kl-steps", "2", "--eval-windows", "2", "--warmup", "1", "--save-dtype", "float16");
        Assert.True(code == 0, output + error);
        Assert.Contains("Conversion order from", output, StringComparison.Ordinal);
        Assert.Contains("step 14/14", output, StringComparison.Ordinal);
        Assert.Contains("ETA", output, StringComparison.Ordinal);
        var manifest = DslaManifest.TryLoad(_model)!;
        Assert.Equal(["dsla", "dsla-foldable", "gla"], manifest.Variants.Keys.Order());
        Assert.All(manifest.Variants.Values, v => Assert.Equal(manifest.Order, v.Order));
        Assert.All(manifest.Variants.Values, v => Assert.Equal(14, v.Steps));
        foreach (var entry in manifest.Variants.Values)
        {
            // Weights in the asked storage type, the mixing scalars γ in fp32.
            using var weights = DslaMesh.Engine.Checkpoints.SafeTensorsFile.Open(Path.Combine(_model, DslaManifest.FolderName, entry.File));
            Assert.All(weights.Entries.Values, e => Assert.Equal(e.Name.EndsWith(".alpha_list", StringComparison.Ordinal) ? "F32" : "F16", e.DType));
        }

        // --resume on finished variants skips them.
        (code, output, _) = await RunAsync("distill", "--model", _model, "--data", _brown, "--variant", "gla", "--steps-per-layer", "3", "--seq-len", "32",
            "--batch", "2", "--kl-steps", "2", "--eval-windows", "2", "--warmup", "1", "--save-dtype", "float16", "--resume");
        Assert.Equal(0, code);
        Assert.Contains("already distilled", output, StringComparison.Ordinal);

        // eval: table, JSON and PNG.
        var jsonPath = Path.Combine(_out, "eval.json");
        var plotPath = Path.Combine(_out, "plots", "eval.png");
        (code, output, error) = await RunAsync("eval", "--model", _model, "--data", _brown, "--fractions", "0,0.5,1", "--recall-fractions", "0,0.5",
            "--lengths", "96,160", "--trials", "3", "--kv-pairs", "3", "--max-new-tokens", "4", "--seq-len", "64", "--ppl-tokens", "256", "--json", jsonPath, "--plot", plotPath);
        Assert.True(code == 0, output + error);
        Assert.Contains("passkey@160", output, StringComparison.Ordinal);
        Assert.Contains("dsla-foldable", output, StringComparison.Ordinal);

        var png = File.ReadAllBytes(plotPath);
        Assert.Equal(new byte[] { 0x89, 0x50, 0x4E, 0x47, 0x0D, 0x0A, 0x1A, 0x0A }, png.Take(8));
        Assert.True(png.Length > 10_000, $"PNG of {png.Length} bytes");
        // The plot's text uses the font shipped beside dslactl, not whatever the host has (GPU containers have none).
        Assert.True(File.Exists(Path.Combine(AppContext.BaseDirectory, "Fonts", "DejaVuSans.ttf")));
        Assert.NotNull(ScottPlot.Fonts.GetTypeface("DejaVu Sans (dslactl)", bold: false, italic: false));

        using var report = JsonDocument.Parse(File.ReadAllText(jsonPath));
        var root = report.RootElement;
        var teacher = root.GetProperty("teacher");
        Assert.Equal(0, teacher.GetProperty("fraction").GetDouble());
        Assert.Equal(2, teacher.GetProperty("passkey").GetArrayLength());
        var rows = root.GetProperty("results").EnumerateArray().ToList();
        Assert.Equal(3 * 3, rows.Count);
        foreach (var row in rows)
        {
            var fraction = row.GetProperty("fraction").GetDouble();
            var layers = row.GetProperty("dsla_layers").GetArrayLength();
            Assert.Equal((int)(fraction * 4), layers);
            Assert.True(row.GetProperty("perplexity").GetDouble() > 1);
            Assert.Equal(fraction <= 0.5, row.TryGetProperty("passkey", out _));
            if (fraction <= 0.5)
            {
                var score = row.GetProperty("kv")[1];
                Assert.Equal(160, score.GetProperty("length").GetInt32());
                Assert.Equal(3, score.GetProperty("trials").GetInt32());
            }
        }
        // Converting layers changes the model: perplexity at 1.0 differs from the teacher's.
        Assert.NotEqual(teacher.GetProperty("perplexity").GetDouble(), rows.Last(r => r.GetProperty("fraction").GetDouble() == 1).GetProperty("perplexity").GetDouble());
    }
}

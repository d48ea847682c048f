using DslaMesh.Engine.Distillation;
using ScottPlot;

namespace DslaMesh.Cli.Commands;

/// <summary>
/// Draws an evaluation report as one PNG with three panels against the fraction of layers converted: held-out
/// perplexity, passkey accuracy and key–value accuracy (one colour per variant, one line pattern per prompt length).
/// ScottPlot renders through SkiaSharp's self-contained Linux build, so it needs no display or system libraries; the
/// text is drawn with DejaVu Sans shipped beside dslactl (<c>Fonts/</c>), because GPU containers often have no fonts at
/// all and the labels would otherwise be missing.
/// </summary>
internal static class EvalPlot
{
    /// <summary>The family name the shipped font is registered under.</summary>
    public const string FontFamily = "DejaVu Sans (dslactl)";

    private static readonly Lazy<bool> ShippedFont = new(RegisterShippedFont);
    private static readonly LinePattern[] Patterns = [LinePattern.Solid, LinePattern.Dashed, LinePattern.Dotted, LinePattern.DenselyDashed];
    private static readonly MarkerShape[] Markers = [MarkerShape.FilledCircle, MarkerShape.FilledSquare, MarkerShape.FilledTriangleUp, MarkerShape.FilledDiamond];

    /// <summary>Writes the plot; returns the path written.</summary>
    public static string Write(EvaluationReport report, string path, int width = 1800, int height = 560)
    {
        var palette = new ScottPlot.Palettes.Category10();
        var variants = report.Results.Select(r => r.Variant).Distinct().ToList();
        var multiplot = new Multiplot();
        multiplot.AddPlots(3);
        if (ShippedFont.Value)
        {
            foreach (var panel in multiplot.GetPlots())
            {
                panel.Font.Set(FontFamily);
            }
        }
        multiplot.Layout = new ScottPlot.MultiplotLayouts.Columns();
        var perplexity = multiplot.GetPlot(0);
        var passkey = multiplot.GetPlot(1);
        var keyValue = multiplot.GetPlot(2);

        for (var v = 0; v < variants.Count; v++)
        {
            var color = palette.GetColor(v);
            var rows = report.Results.Where(r => r.Variant == variants[v] && r.Skipped is null).OrderBy(r => r.Fraction).ToList();
            var ppl = rows.Where(r => r.Perplexity is not null).ToList();
            if (ppl.Count > 0)
            {
                var line = perplexity.Add.Scatter(ppl.Select(r => r.Fraction).ToArray(), ppl.Select(r => r.Perplexity!.Value).ToArray(), color);
                line.LegendText = variants[v];
                line.MarkerShape = Markers[v % Markers.Length];
                line.MarkerSize = 7;
            }
            AddRecall(passkey, variants[v], rows, r => r.Passkey, color, v);
            AddRecall(keyValue, variants[v], rows, r => r.KeyValue, color, v);
        }

        Style(perplexity, "Held-out Brown perplexity", "perplexity", Alignment.UpperLeft);
        Style(passkey, "Passkey retrieval", "accuracy");
        Style(keyValue, $"Key-value retrieval ({report.Settings.KvPairs} pairs)", "accuracy");
        foreach (var plot in new[] { passkey, keyValue })
        {
            plot.Axes.SetLimitsY(-0.05, 1.05);
        }
        perplexity.Axes.Margins(bottom: 0.1, top: 0.1);
        var directory = Path.GetDirectoryName(Path.GetFullPath(path));
        if (!string.IsNullOrEmpty(directory))
        {
            Directory.CreateDirectory(directory);
        }
        multiplot.SavePng(path, width, height);
        return path;
    }

    /// <summary>Registers the shipped font once per process; false when it is missing.</summary>
    internal static bool RegisterShippedFontOnce() => ShippedFont.Value;

    /// <summary>Registers Fonts/DejaVuSans*.ttf from the application folder; false when they are missing.</summary>
    internal static bool RegisterShippedFont()
    {
        var folder = Path.Combine(AppContext.BaseDirectory, "Fonts");
        var regular = Path.Combine(folder, "DejaVuSans.ttf");
        var bold = Path.Combine(folder, "DejaVuSans-Bold.ttf");
        if (!File.Exists(regular))
        {
            return false;
        }
        Fonts.AddFontFile(FontFamily, regular, bold: false, italic: false);
        Fonts.AddFontFile(FontFamily, File.Exists(bold) ? bold : regular, bold: true, italic: false);
        return true;
    }

    private static void AddRecall(Plot plot, string variant, List<EvaluationRow> rows, Func<EvaluationRow, List<RecallScore>?> scores, Color color, int variantIndex)
    {
        var measured = rows.Where(r => scores(r) is not null).ToList();
        if (measured.Count == 0)
        {
            return;
        }
        var lengths = scores(measured[0])!.Select(s => s.Length).ToList();
        for (var l = 0; l < lengths.Count; l++)
        {
            var length = lengths[l];
            var xs = measured.Select(r => r.Fraction).ToArray();
            var ys = measured.Select(r => scores(r)!.First(s => s.Length == length).Accuracy).ToArray();
            var line = plot.Add.Scatter(xs, ys, color);
            line.LegendText = $"{variant} @ {length}";
            line.LinePattern = Patterns[l % Patterns.Length];
            line.MarkerShape = Markers[variantIndex % Markers.Length];
            line.MarkerSize = 6;
        }
    }

    private static void Style(Plot plot, string title, string yLabel, Alignment legend = Alignment.LowerLeft)
    {
        plot.Title(title);
        plot.XLabel("fraction of layers converted (sensitivity order)");
        plot.YLabel(yLabel);
        plot.Axes.SetLimitsX(-0.05, 1.05);
        plot.ShowLegend(legend);
    }
}

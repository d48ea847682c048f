using DslaMesh.Cli.Commands;
using ScottPlot;

namespace DslaMesh.Cli.Replay;

/// <summary>
/// Draws a replay as one PNG, one panel per mode over a shared time axis: each finished request's end-to-end latency
/// per output token (dots, left axis, at its finish time) and each service's fraction of DSLA layers (steps, right axis).
/// With <c>--repeat</c>, the first repetition is drawn.
/// </summary>
internal static class ReplayPlot
{
    /// <summary>Writes the plot; returns the path written.</summary>
    public static string Write(ReplayReport report, string path, int width = 1600, int panelHeight = 340)
    {
        var palette = new ScottPlot.Palettes.Category10();
        var multiplot = new Multiplot();
        multiplot.AddPlots(report.Modes.Count);
        multiplot.Layout = new ScottPlot.MultiplotLayouts.Rows();
        var fonts = EvalPlot.RegisterShippedFontOnce();
        var end = report.Modes.Select(m => Math.Max(m.Requests.Count == 0 ? 0 : m.Requests.Max(r => r.FinishedSeconds), m.Mix.Count == 0 ? 0 : m.Mix.Max(s => s.Seconds))).DefaultIfEmpty(1).Max();
        var services = report.Modes.SelectMany(m => m.Mix.Select(s => s.ServiceId)).Distinct().Order().ToList();
        var top = report.Modes.SelectMany(m => m.Requests).Where(r => r.LatencyPerTokenMs is not null).Select(r => r.LatencyPerTokenMs!.Value).DefaultIfEmpty(1).Max();
        for (var i = 0; i < report.Modes.Count; i++)
        {
            var mode = report.Modes[i] with
            {
                Requests = [.. report.Modes[i].Requests.Where(r => r.Round == 0)],
                Mix = [.. report.Modes[i].Mix.Where(m => m.Round == 0)],
            };
            var plot = multiplot.GetPlot(i);
            if (fonts)
            {
                plot.Font.Set(EvalPlot.FontFamily);
            }
            var ok = mode.Requests.Where(r => r.LatencyPerTokenMs is not null).OrderBy(r => r.FinishedSeconds).ToList();
            if (ok.Count > 0)
            {
                var dots = plot.Add.Scatter(ok.Select(r => r.FinishedSeconds).ToArray(), ok.Select(r => r.LatencyPerTokenMs!.Value).ToArray(), Colors.Black.WithAlpha(0.6));
                dots.LineWidth = 0;
                dots.MarkerSize = 4;
                dots.LegendText = "latency per output token (ms)";
            }
            for (var s = 0; s < services.Count; s++)
            {
                var samples = mode.Mix.Where(m => m.ServiceId == services[s]).OrderBy(m => m.Seconds).ToList();
                if (samples.Count == 0)
                {
                    continue;
                }
                var steps = plot.Add.Scatter(samples.Select(m => m.Seconds).ToArray(), samples.Select(m => m.LayerCount == 0 ? 0 : (double)m.DslaLayers / m.LayerCount).ToArray(), palette.GetColor(s + 1));
                steps.ConnectStyle = ConnectStyle.StepHorizontal;
                steps.MarkerSize = 0;
                steps.LineWidth = 2;
                steps.LegendText = $"{services[s]} DSLA fraction";
                steps.Axes.YAxis = plot.Axes.Right;
            }
            var m2 = mode.Summary;
            plot.Title($"{m2.Mode} ({m2.Description}): mean {m2.LatencyPerToken?.Mean:F1} ms/token, p99 {m2.LatencyPerToken?.P99:F1}, {m2.Rejected} rejected, {m2.Conversions} conversions");
            plot.XLabel("seconds since the replay started");
            plot.YLabel("ms per output token");
            plot.Axes.Right.Label.Text = "fraction of layers DSLA";
            plot.Axes.SetLimitsX(0, end * 1.02);
            plot.Axes.SetLimitsY(0, top * 1.05);
            plot.Axes.SetLimitsY(-0.02, 1.02, plot.Axes.Right);
            plot.ShowLegend(Alignment.UpperLeft);
        }
        var directory = Path.GetDirectoryName(Path.GetFullPath(path));
        if (!string.IsNullOrEmpty(directory))
        {
            Directory.CreateDirectory(directory);
        }
        multiplot.SavePng(path, width, panelHeight * Math.Max(1, report.Modes.Count));
        return path;
    }
}

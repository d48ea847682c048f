using System.CommandLine;
using System.Globalization;
using System.Text;
using DslaMesh.Protos.V1;
using Spectre.Console;

namespace DslaMesh.Cli.Commands;

/// <summary><c>dslactl status</c>: every model service's layer mix and load, as the controller sees them.</summary>
public static class StatusCommand
{
    /// <summary>Builds the command.</summary>
    public static Command Create()
    {
        var controller = new ControllerClientOptions();
        var command = new Command("status", "Show each model service: every layer as attention (A) or DSLA (D), epoch, queue, KV use, TTFT/ITL.");
        controller.AddTo(command);
        command.SetAction((result, ct) => ControllerClientOptions.GuardAsync(result, async output =>
        {
            var (client, channel) = controller.Connect(result);
            using var _ = channel;
            var reply = await client.GetStatusAsync(new GetStatusRequest(), cancellationToken: ct);
            if (controller.Json(result))
            {
                await output.WriteLineAsync(ControllerClientOptions.ToJson(reply));
                return ExitCodes.Ok;
            }
            await output.WriteLineAsync(string.Create(CultureInfo.InvariantCulture,
                $"controller {reply.ControllerId} ({(reply.Leader ? "leader" : "standby")}), policy version {reply.PolicyVersion}, Redis {(reply.RedisConnected ? "reachable" : "UNREACHABLE")}"));
            if (reply.Services.Count == 0)
            {
                await output.WriteLineAsync("no model services registered");
                return ExitCodes.Ok;
            }
            var table = new Table().AddColumns("Service", "Layers (A attention, D DSLA)", "DSLA", "Epoch", "Queue", "Running", "KV use", "TTFT p50/p99", "ITL p50/p99", "Last seen", "Stream");
            var now = DateTimeOffset.UtcNow;
            foreach (var s in reply.Services)
            {
                var layers = Layers(s.LayerCount, s.DslaLayers);
                var desired = s.DesiredDslaLayers.Order().SequenceEqual(s.DslaLayers.Order()) ? "" : $"\n[grey]wanted {Layers(s.LayerCount, s.DesiredDslaLayers)}[/]";
                var kv = s.KvTotalBytes > 0 ? $"{Bytes(s.KvUsedBytes)} / {Bytes(s.KvTotalBytes)} ({100.0 * s.KvUsedBytes / s.KvTotalBytes:F0}%)" : Bytes(s.KvUsedBytes);
                var seen = s.LastSeen is null ? "never" : $"{Math.Max(0, (now - s.LastSeen.ToDateTimeOffset()).TotalSeconds):F1} s ago";
                table.AddRow(
                    Markup.Escape(s.Id) + (s.Draining ? " [yellow](draining)[/]" : ""),
                    layers + desired,
                    string.Create(CultureInfo.InvariantCulture, $"{s.DslaLayers.Count}/{s.LayerCount} (cap {s.CapLayers})"),
                    s.DesiredEpoch > s.Epoch ? $"{s.Epoch} → {s.DesiredEpoch}" : s.Epoch.ToString(CultureInfo.InvariantCulture),
                    s.QueueDepth.ToString(CultureInfo.InvariantCulture),
                    s.Running.ToString(CultureInfo.InvariantCulture),
                    kv,
                    string.Create(CultureInfo.InvariantCulture, $"{s.TtftP50 * 1000:F0}/{s.TtftP99 * 1000:F0} ms"),
                    string.Create(CultureInfo.InvariantCulture, $"{s.ItlP50 * 1000:F1}/{s.ItlP99 * 1000:F1} ms"),
                    seen,
                    s.Connected ? "[green]up[/]" : "[red]down[/]");
            }
            PolicyCommands.Render(output, table);
            foreach (var s in reply.Services.Where(s => s.LastDecision.Length > 0))
            {
                await output.WriteLineAsync($"{s.Id}: {s.LastDecision}");
            }
            return ExitCodes.Ok;
        }));
        return command;
    }

    /// <summary>"AAAADDAA AAAA…": one letter per layer, in groups of eight.</summary>
    public static string Layers(int count, IEnumerable<int> dsla)
    {
        var set = dsla.ToHashSet();
        var text = new StringBuilder();
        for (var layer = 0; layer < count; layer++)
        {
            if (layer > 0 && layer % 8 == 0)
            {
                text.Append(' ');
            }
            text.Append(set.Contains(layer) ? "[blue]D[/]" : "A");
        }
        return text.ToString();
    }

    private static string Bytes(long bytes) => bytes switch
    {
        >= 1L << 30 => string.Create(CultureInfo.InvariantCulture, $"{bytes / (double)(1L << 30):F1} GiB"),
        >= 1L << 20 => string.Create(CultureInfo.InvariantCulture, $"{bytes / (double)(1L << 20):F1} MiB"),
        >= 1L << 10 => string.Create(CultureInfo.InvariantCulture, $"{bytes / (double)(1L << 10):F1} KiB"),
        _ => string.Create(CultureInfo.InvariantCulture, $"{bytes} B"),
    };
}

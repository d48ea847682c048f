using System.CommandLine;
using System.Globalization;
using System.Text.Json;
using DslaMesh.Policy;
using DslaMesh.Protos.V1;
using Spectre.Console;

namespace DslaMesh.Cli.Commands;

/// <summary><c>dslactl policy …</c>: read, change, check, compare, roll back and try out the controller's policy.</summary>
public static class PolicyCommands
{
    /// <summary>Builds <c>policy</c> and its subcommands.</summary>
    public static Command Create()
    {
        var policy = new Command("policy", "Read and change the controller's layer-conversion policy.");
        policy.Subcommands.Add(Get());
        policy.Subcommands.Add(Set());
        policy.Subcommands.Add(Validate());
        policy.Subcommands.Add(Diff());
        policy.Subcommands.Add(History());
        policy.Subcommands.Add(Rollback());
        policy.Subcommands.Add(DryRunCommand());
        return policy;
    }

    private static Option<FileInfo> FileOption() => new("--file", "-f") { Description = "Policy JSON file.", Required = true };

    private static async Task<string> ReadAsync(FileInfo file, CancellationToken cancellationToken) =>
        file.Exists ? await File.ReadAllTextAsync(file.FullName, cancellationToken).ConfigureAwait(false) : throw new FileNotFoundException($"{file.FullName}: no such file");

    private static Command Get()
    {
        var controller = new ControllerClientOptions();
        var command = new Command("get", "Print the policy in force (JSON; --output json adds version, author and time).");
        controller.AddTo(command);
        command.SetAction((result, ct) => ControllerClientOptions.GuardAsync(result, async output =>
        {
            var (client, channel) = controller.Connect(result);
            using var _ = channel;
            var reply = await client.GetPolicyAsync(new GetPolicyRequest(), cancellationToken: ct);
            if (controller.Json(result))
            {
                await output.WriteLineAsync(ControllerClientOptions.ToJson(reply));
            }
            else
            {
                await output.WriteLineAsync(reply.PolicyJson);
                await result.InvocationConfiguration.Error.WriteLineAsync($"# version {reply.Version}, set by {reply.SetBy} at {reply.SetAt?.ToDateTimeOffset():u}: {reply.Comment}");
            }
            return ExitCodes.Ok;
        }));
        return command;
    }

    private static Command Set()
    {
        var controller = new ControllerClientOptions();
        var file = FileOption();
        var comment = new Option<string>("--comment", "-m") { Description = "Why (kept in the history).", DefaultValueFactory = _ => "" };
        var command = new Command("set", "Validate a policy file and make it the policy in force (a new version).");
        controller.AddTo(command);
        command.Options.Add(file);
        command.Options.Add(comment);
        command.SetAction((result, ct) => ControllerClientOptions.GuardAsync(result, async output =>
        {
            var json = await ReadAsync(result.GetValue(file)!, ct);
            var (client, channel) = controller.Connect(result);
            using var _ = channel;
            var reply = await client.SetPolicyAsync(new SetPolicyRequest { PolicyJson = json, Comment = result.GetValue(comment) ?? "", SetBy = $"dslactl@{Environment.UserName}" }, cancellationToken: ct);
            await output.WriteLineAsync(controller.Json(result) ? ControllerClientOptions.ToJson(reply) : $"policy version {reply.Version} is in force");
            return ExitCodes.Ok;
        }));
        return command;
    }

    private static Command Validate()
    {
        var controller = new ControllerClientOptions();
        var file = FileOption();
        var local = new Option<bool>("--local") { Description = "Validate here, without the controller." };
        var command = new Command("validate", "Check a policy file; prints every problem with its JSON path (exit code 2 when invalid).");
        controller.AddTo(command);
        command.Options.Add(file);
        command.Options.Add(local);
        command.SetAction((result, ct) => ControllerClientOptions.GuardAsync(result, async output =>
        {
            var json = await ReadAsync(result.GetValue(file)!, ct);
            ValidatePolicyReply reply;
            if (result.GetValue(local))
            {
                var parsed = PolicyParser.Parse(json);
                reply = new ValidatePolicyReply { Valid = parsed.IsValid, NormalizedJson = parsed.IsValid ? PolicyParser.Serialize(parsed.Policy!) : "" };
                reply.Errors.Add(parsed.Errors);
            }
            else
            {
                var (client, channel) = controller.Connect(result);
                using var _ = channel;
                reply = await client.ValidatePolicyAsync(new ValidatePolicyRequest { PolicyJson = json }, cancellationToken: ct);
            }
            if (controller.Json(result))
            {
                await output.WriteLineAsync(ControllerClientOptions.ToJson(reply));
            }
            else if (reply.Valid)
            {
                await output.WriteLineAsync("policy is valid");
            }
            else
            {
                foreach (var error in reply.Errors)
                {
                    await result.InvocationConfiguration.Error.WriteLineAsync($"invalid: {error}");
                }
            }
            return reply.Valid ? ExitCodes.Ok : ExitCodes.InvalidInput;
        }));
        return command;
    }

    private static Command Diff()
    {
        var controller = new ControllerClientOptions();
        var file = FileOption();
        var command = new Command("diff", "Compare a policy file with the policy in force (exit code 1 when they differ).");
        controller.AddTo(command);
        command.Options.Add(file);
        command.SetAction((result, ct) => ControllerClientOptions.GuardAsync(result, async output =>
        {
            var parsed = PolicyParser.Parse(await ReadAsync(result.GetValue(file)!, ct));
            if (!parsed.IsValid)
            {
                throw new ArgumentException("the file is not a valid policy: " + string.Join("; ", parsed.Errors));
            }
            var (client, channel) = controller.Connect(result);
            using var _ = channel;
            var reply = await client.GetPolicyAsync(new GetPolicyRequest(), cancellationToken: ct);
            var current = PolicyParser.Parse(reply.PolicyJson).Policy ?? throw new FormatException("the controller's policy could not be read");
            var changes = PolicyDiff.Compare(current, parsed.Policy!);
            if (controller.Json(result))
            {
                await output.WriteLineAsync(JsonSerializer.Serialize(changes.Select(c => new Dictionary<string, string?> { ["path"] = c.Path, ["current"] = c.Before, ["file"] = c.After }).ToList(), CliJsonContext.Default.ListDictionaryStringString));
            }
            else if (changes.Count == 0)
            {
                await output.WriteLineAsync($"no differences from version {reply.Version}");
            }
            else
            {
                await output.WriteLineAsync($"--- version {reply.Version} (in force)");
                await output.WriteLineAsync($"+++ {result.GetValue(file)!.Name}");
                foreach (var change in changes)
                {
                    if (change.Before is not null)
                    {
                        await output.WriteLineAsync($"- {change.Path}: {change.Before}");
                    }
                    if (change.After is not null)
                    {
                        await output.WriteLineAsync($"+ {change.Path}: {change.After}");
                    }
                }
            }
            return changes.Count == 0 ? ExitCodes.Ok : ExitCodes.Different;
        }));
        return command;
    }

    private static Command History()
    {
        var controller = new ControllerClientOptions();
        var limit = new Option<int>("--limit", "-n") { Description = "Show the newest N versions (0 = all)." };
        var command = new Command("history", "List policy versions, newest first.");
        controller.AddTo(command);
        command.Options.Add(limit);
        command.SetAction((result, ct) => ControllerClientOptions.GuardAsync(result, async output =>
        {
            var (client, channel) = controller.Connect(result);
            using var _ = channel;
            var reply = await client.GetPolicyHistoryAsync(new GetPolicyHistoryRequest { Limit = result.GetValue(limit) }, cancellationToken: ct);
            if (controller.Json(result))
            {
                await output.WriteLineAsync(ControllerClientOptions.ToJson(reply));
                return ExitCodes.Ok;
            }
            var table = new Table().AddColumns("", "Version", "Set at (UTC)", "Set by", "Comment");
            foreach (var entry in reply.Versions)
            {
                table.AddRow(entry.Version == reply.CurrentVersion ? "*" : "", entry.Version.ToString(CultureInfo.InvariantCulture),
                    entry.SetAt?.ToDateTimeOffset().ToString("u", CultureInfo.InvariantCulture) ?? "", Markup.Escape(entry.SetBy), Markup.Escape(entry.Comment));
            }
            Render(output, table);
            if (reply.Versions.Count == 0)
            {
                await output.WriteLineAsync("no policy has been set; the built-in default (version 0) is in force");
            }
            return ExitCodes.Ok;
        }));
        return command;
    }

    private static Command Rollback()
    {
        var controller = new ControllerClientOptions();
        var to = new Option<long?>("--to") { Description = "The version to restore (default: the one before the current)." };
        var command = new Command("rollback", "Make an earlier policy version current again (stored as a new version).");
        controller.AddTo(command);
        command.Options.Add(to);
        command.SetAction((result, ct) => ControllerClientOptions.GuardAsync(result, async output =>
        {
            var (client, channel) = controller.Connect(result);
            using var _ = channel;
            var request = new RollbackPolicyRequest { SetBy = $"dslactl@{Environment.UserName}" };
            if (result.GetValue(to) is { } version)
            {
                request.ToVersion = version;
            }
            var reply = await client.RollbackPolicyAsync(request, cancellationToken: ct);
            await output.WriteLineAsync(controller.Json(result) ? ControllerClientOptions.ToJson(reply) : $"policy version {reply.Version} is in force ({reply.Comment})");
            return ExitCodes.Ok;
        }));
        return command;
    }

    private static Command DryRunCommand()
    {
        var file = FileOption();
        var trace = new Option<FileInfo>("--trace") { Description = "Metrics trace: JSON lines of metrics records as services publish them.", Required = true };
        var order = new Option<string?>("--order") { Description = "Sensitivity order (layers to convert first), e.g. 31,30,29 (default: last layer first)." };
        var all = new Option<bool>("--all") { Description = "Also print evaluations that changed nothing." };
        var output = ControllerClientOptions.OutputOption();
        var command = new Command("dry-run", "Replay a recorded metrics trace through a policy and print the decisions it would have made (runs locally).");
        command.Options.Add(file);
        command.Options.Add(trace);
        command.Options.Add(order);
        command.Options.Add(all);
        command.Options.Add(output);
        command.SetAction((result, ct) => ControllerClientOptions.GuardAsync(result, async writer =>
        {
            var parsed = PolicyParser.Parse(await ReadAsync(result.GetValue(file)!, ct));
            if (!parsed.IsValid)
            {
                throw new ArgumentException("the policy is not valid: " + string.Join("; ", parsed.Errors));
            }
            var traceFile = result.GetValue(trace)!;
            if (!traceFile.Exists)
            {
                throw new FileNotFoundException($"{traceFile.FullName}: no such file");
            }
            IReadOnlyList<Fleet.ServiceMetricsRecord> records;
            using (var reader = traceFile.OpenText())
            {
                records = DryRun.ReadTrace(reader);
            }
            var fixedOrder = result.GetValue(order) is { } text ? ControllerClientOptions.ParseLayers(text, "--order") : null;
            var decisions = DryRun.Replay(parsed.Policy!, records,
                fixedOrder is null ? null : (_, layers) => [.. fixedOrder.Where(l => l < layers)], result.GetValue(all));
            if (result.GetValue(output) == "json")
            {
                await writer.WriteLineAsync(JsonSerializer.Serialize(decisions.ToList(), PolicyJsonContext.Default.ListDryRunDecision));
                return ExitCodes.Ok;
            }
            foreach (var d in decisions)
            {
                var changed = d.Changed.Count > 0 ? $" [{string.Join(",", d.Changed)}]" : "";
                await writer.WriteLineAsync(string.Create(CultureInfo.InvariantCulture,
                    $"{d.Timestamp:yyyy-MM-ddTHH:mm:ss.fffZ}  {d.Service}  {d.Action}{changed}  dsla=[{string.Join(",", d.DslaLayers)}] {d.DslaLayers.Count}/{d.LayerCount} (cap {d.CapLayers})  {d.Reason}"));
            }
            var services = records.Select(r => r.Id).Distinct().Count();
            await writer.WriteLineAsync(string.Create(CultureInfo.InvariantCulture,
                $"{decisions.Count(d => d.Action == "convert")} conversions, {decisions.Count(d => d.Action == "revert")} reversions over {records.Count} records from {services} services"));
            return ExitCodes.Ok;
        }));
        return command;
    }

    /// <summary>Renders a Spectre widget to a writer (plain text when it is not a terminal).</summary>
    public static void Render(TextWriter output, Spectre.Console.Rendering.IRenderable widget)
    {
        var terminal = ReferenceEquals(output, Console.Out) && !Console.IsOutputRedirected;
        var console = AnsiConsole.Create(new AnsiConsoleSettings
        {
            Out = new AnsiConsoleOutput(output),
            Interactive = InteractionSupport.No,
            Ansi = terminal ? AnsiSupport.Detect : AnsiSupport.No,
            ColorSystem = terminal ? ColorSystemSupport.Detect : ColorSystemSupport.NoColors,
        });
        if (!terminal)
        {
            console.Profile.Width = 200;
        }
        console.Write(widget);
    }
}

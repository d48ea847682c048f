using System.CommandLine;
using DslaMesh.Protos.V1;

namespace DslaMesh.Cli.Commands;

/// <summary><c>dslactl convert</c>: convert or revert layers of one service now, through the controller.</summary>
public static class ConvertCommand
{
    /// <summary>Builds the command.</summary>
    public static Command Create()
    {
        var controller = new ControllerClientOptions();
        var service = new Option<string>("--service", "-s") { Description = "Model service id (see dslactl status).", Required = true };
        var layers = new Option<string>("--layers", "-l") { Description = "Layers, e.g. 0,1,5-7.", Required = true };
        var to = new Option<string>("--to") { Description = "dsla or attention.", Required = true };
        to.AcceptOnlyFromAmong("dsla", "attention");
        var hold = new Option<double>("--hold") { Description = "Seconds the policy leaves these layers alone (default: the controller's, 5 minutes)." };
        var command = new Command("convert", "Convert layers of a model service to DSLA or back to attention now; the controller applies it with a new epoch.");
        controller.AddTo(command);
        command.Options.Add(service);
        command.Options.Add(layers);
        command.Options.Add(to);
        command.Options.Add(hold);
        command.SetAction((result, ct) => ControllerClientOptions.GuardAsync(result, async output =>
        {
            var request = new ConvertRequest
            {
                ServiceId = result.GetValue(service)!,
                ToDsla = result.GetValue(to) == "dsla",
                HoldSeconds = result.GetValue(hold) >= 0 ? result.GetValue(hold) : throw new ArgumentException("--hold: give 0 or more seconds."),
            };
            request.Layers.Add(ControllerClientOptions.ParseLayers(result.GetValue(layers)!, "--layers"));
            var (client, channel) = controller.Connect(result);
            using var _ = channel;
            var reply = await client.ConvertAsync(request, cancellationToken: ct);
            if (controller.Json(result))
            {
                await output.WriteLineAsync(ControllerClientOptions.ToJson(reply));
            }
            else if (reply.Accepted)
            {
                await output.WriteLineAsync($"{request.ServiceId}: epoch {reply.Epoch} applied; DSLA layers [{string.Join(",", reply.DslaLayers)}] of {reply.LayerCount}");
            }
            else
            {
                await result.InvocationConfiguration.Error.WriteLineAsync($"error: {request.ServiceId} refused: {reply.Reason}");
            }
            return reply.Accepted ? ExitCodes.Ok : ExitCodes.ServiceError;
        }));
        return command;
    }
}

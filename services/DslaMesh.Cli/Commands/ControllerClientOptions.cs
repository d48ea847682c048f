using System.CommandLine;
using System.Text.Json;
using DslaMesh.Protos.V1;
using Google.Protobuf;
using Grpc.Core;
using Grpc.Net.Client;

namespace DslaMesh.Cli.Commands;

/// <summary>How a command reaches the controller's admin API, and how it prints.</summary>
public sealed class ControllerClientOptions
{
    /// <summary>The environment variable holding the admin token.</summary>
    public const string TokenVariable = "DSLAMESH_ADMIN_TOKEN";

    private static readonly JsonFormatter ProtoJson = new(JsonFormatter.Settings.Default.WithFormatDefaultValues(true).WithIndentation());

    public Option<string> Controller { get; } = new("--controller") { Description = "Controller admin gRPC address.", DefaultValueFactory = _ => "http://127.0.0.1:5301" };
    public Option<string?> Token { get; } = new("--token") { Description = $"Admin token (default: ${TokenVariable})." };
    public Option<string> Output { get; } = OutputOption();

    /// <summary>The shared <c>--output text|json</c> option.</summary>
    public static Option<string> OutputOption()
    {
        var option = new Option<string>("--output", "-o") { Description = "text or json.", DefaultValueFactory = _ => "text" };
        option.AcceptOnlyFromAmong("text", "json");
        return option;
    }

    /// <summary>Adds the options to a command.</summary>
    public void AddTo(Command command)
    {
        command.Options.Add(Controller);
        command.Options.Add(Token);
        command.Options.Add(Output);
    }

    /// <summary>Whether JSON output was asked for.</summary>
    public bool Json(ParseResult result) => result.GetValue(Output) == "json";

    /// <summary>A client for the controller, with the bearer token on every call.</summary>
    public (ControllerAdmin.ControllerAdminClient Client, GrpcChannel Channel) Connect(ParseResult result)
    {
        var address = result.GetValue(Controller)!;
        if (!Uri.TryCreate(address, UriKind.Absolute, out var uri) || uri.Scheme is not ("http" or "https"))
        {
            throw new ArgumentException($"--controller: '{address}' is not an http:// or https:// URL.");
        }
        var token = result.GetValue(Token) ?? Environment.GetEnvironmentVariable(TokenVariable);
        if (string.IsNullOrWhiteSpace(token))
        {
            throw new RpcException(new Status(StatusCode.Unauthenticated, $"no admin token: pass --token or set {TokenVariable}"));
        }
        var credentials = CallCredentials.FromInterceptor((_, metadata) =>
        {
            metadata.Add("authorization", $"Bearer {token}");
            return Task.CompletedTask;
        });
        var channel = GrpcChannel.ForAddress(uri, new GrpcChannelOptions
        {
            Credentials = ChannelCredentials.Create(uri.Scheme == "https" ? ChannelCredentials.SecureSsl : ChannelCredentials.Insecure, credentials),
            UnsafeUseInsecureChannelCallCredentials = uri.Scheme == "http",
        });
        return (new ControllerAdmin.ControllerAdminClient(channel), channel);
    }

    /// <summary>A protobuf message as indented JSON.</summary>
    public static string ToJson(IMessage message) => ProtoJson.Format(message);

    /// <summary>
    /// Runs an admin command body: gRPC and input errors become a one-line message on stderr and an exit code
    /// (no stack traces).
    /// </summary>
    public static async Task<int> GuardAsync(ParseResult result, Func<TextWriter, Task<int>> body)
    {
        var error = result.InvocationConfiguration.Error;
        try
        {
            return await body(result.InvocationConfiguration.Output).ConfigureAwait(false);
        }
        catch (RpcException e)
        {
            var (code, what) = e.StatusCode switch
            {
                StatusCode.Unauthenticated => (ExitCodes.Unauthenticated, "unauthenticated"),
                StatusCode.InvalidArgument => (ExitCodes.InvalidInput, "refused"),
                StatusCode.NotFound => (ExitCodes.NotFound, "not found"),
                StatusCode.FailedPrecondition => (ExitCodes.ServiceError, "not possible now"),
                StatusCode.Unavailable or StatusCode.DeadlineExceeded => (ExitCodes.ServiceError, "cannot reach the service"),
                StatusCode.Cancelled => (ExitCodes.Cancelled, "cancelled"),
                _ => (ExitCodes.ServiceError, $"the service answered {e.StatusCode}"),
            };
            var detail = string.IsNullOrEmpty(e.Status.Detail) ? e.Status.DebugException?.Message ?? "" : e.Status.Detail;
            await error.WriteLineAsync($"error: {what}: {detail}").ConfigureAwait(false);
            return code;
        }
        catch (Exception e) when (e is ArgumentException or FormatException or JsonException)
        {
            await error.WriteLineAsync($"error: {e.Message}").ConfigureAwait(false);
            return ExitCodes.InvalidInput;
        }
        catch (Exception e) when (e is FileNotFoundException or DirectoryNotFoundException or UnauthorizedAccessException)
        {
            await error.WriteLineAsync($"error: {e.Message}").ConfigureAwait(false);
            return ExitCodes.InvalidInput;
        }
        catch (HttpRequestException e)
        {
            await error.WriteLineAsync($"error: cannot reach the service: {e.Message}").ConfigureAwait(false);
            return ExitCodes.ServiceError;
        }
        catch (OperationCanceledException)
        {
            return ExitCodes.Cancelled;
        }
    }

    /// <summary>Parses "0,1,5-7" into layer numbers.</summary>
    public static int[] ParseLayers(string text, string option)
    {
        var layers = new List<int>();
        foreach (var part in text.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries))
        {
            var range = part.Split('-', 2);
            if (range.Length == 2 && int.TryParse(range[0], System.Globalization.CultureInfo.InvariantCulture, out var from) && int.TryParse(range[1], System.Globalization.CultureInfo.InvariantCulture, out var to) && from >= 0 && to >= from)
            {
                layers.AddRange(Enumerable.Range(from, to - from + 1));
            }
            else if (int.TryParse(part, System.Globalization.CultureInfo.InvariantCulture, out var layer) && layer >= 0)
            {
                layers.Add(layer);
            }
            else
            {
                throw new ArgumentException($"{option}: '{part}' is not a layer number or range (e.g. 0,1,5-7).");
            }
        }
        if (layers.Count == 0)
        {
            throw new ArgumentException($"{option}: give at least one layer, e.g. 0,1,5-7.");
        }
        return [.. layers.Distinct()];
    }
}

using DslaMesh.Gateway.Bench;

try
{
    return await GatewayBench.RunAsync(args);
}
catch (Exception e) when (e is InvalidOperationException or TimeoutException or FileNotFoundException)
{
    // A child that did not start or died: the message carries its output; no stack trace of the bench's own.
    await Console.Error.WriteLineAsync($"error: {e.Message}");
    return 1;
}

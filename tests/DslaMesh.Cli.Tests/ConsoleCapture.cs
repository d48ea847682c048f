using System.CommandLine;
using DslaMesh.Cli.Commands;

namespace DslaMesh.Cli.Tests;

/// <summary>Tests that redirect the process's console run one at a time.</summary>
[CollectionDefinition(Name, DisableParallelization = true)]
public sealed class ConsoleCollection
{
    public const string Name = "console";
}

/// <summary>
/// Runs dslactl in-process with the process's console captured: the training-like commands and
/// <c>EngineOptions.GuardAsync</c> write to <see cref="Console"/>, not to the invocation's writers. Callers belong to
/// <see cref="ConsoleCollection"/>.
/// </summary>
public static class ConsoleCapture
{
    public static async Task<(int Code, string Output, string Error)> DslactlAsync(string[] args)
    {
        var (stdout, stderr) = (Console.Out, Console.Error);
        using var output = new StringWriter();
        using var error = new StringWriter();
        Console.SetOut(output);
        Console.SetError(error);
        try
        {
            var code = await DslaCtl.CreateRootCommand().Parse(args).InvokeAsync(new InvocationConfiguration { Output = output, Error = error }, TestContext.Current.CancellationToken);
            return (code, output.ToString(), error.ToString());
        }
        finally
        {
            Console.SetOut(stdout);
            Console.SetError(stderr);
        }
    }
}

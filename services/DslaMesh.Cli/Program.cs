using System.CommandLine;
using DslaMesh.Cli.Commands;

// Ctrl+C cancels the command's token; training then finishes its step and writes a checkpoint, which can take longer
// than System.CommandLine's default 2 s grace period.
return await DslaCtl.CreateRootCommand().Parse(args).InvokeAsync(new InvocationConfiguration { ProcessTerminationTimeout = TimeSpan.FromSeconds(60) });

using System.CommandLine;

namespace DslaMesh.Cli.Commands;

/// <summary>The dslactl command tree.</summary>
public static class DslaCtl
{
    /// <summary>Builds the root command with every subcommand.</summary>
    public static RootCommand CreateRootCommand()
    {
        var root = new RootCommand("dslactl: drive DslaMesh models, services and policies.");
        root.Subcommands.Add(ModelCommands.Create());
        root.Subcommands.Add(GenerateCommand.Create());
        root.Subcommands.Add(DataCommands.Create());
        root.Subcommands.Add(TrainCommand.Create());
        root.Subcommands.Add(PolicyCommands.Create());
        root.Subcommands.Add(StatusCommand.Create());
        root.Subcommands.Add(ConvertCommand.Create());
        root.Subcommands.Add(BenchCommands.Create());
        root.Subcommands.Add(SensitivityCommand.Create());
        root.Subcommands.Add(DistillCommand.Create());
        root.Subcommands.Add(EvalCommand.Create());
        root.Subcommands.Add(KernelCommands.Create());
        return root;
    }
}

using DslaMesh.Cli.Commands;

return await DslaCtl.CreateRootCommand().Parse(args).InvokeAsync();

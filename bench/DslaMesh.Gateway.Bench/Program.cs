using DslaMesh.Gateway.Bench;

return await GatewayBench.RunAsync(args);

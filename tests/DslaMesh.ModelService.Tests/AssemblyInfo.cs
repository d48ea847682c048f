using DslaMesh.Tests.Common;

// TorchSharp must start through TorchRuntime before any test touches it (see TorchCpuRuntime).
[assembly: AssemblyFixture(typeof(TorchCpuRuntime))]

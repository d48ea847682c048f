using DslaMesh.Controller.Tests.Infrastructure;
using DslaMesh.Tests.Common;

// One model folder for the whole assembly; fleet tests time conversions, so they do not share the 2 cores with each other.
[assembly: AssemblyFixture(typeof(TorchCpuRuntime))]   // TorchSharp starts through TorchRuntime first
[assembly: AssemblyFixture(typeof(ModelFixture))]
[assembly: CollectionBehavior(DisableTestParallelization = true)]

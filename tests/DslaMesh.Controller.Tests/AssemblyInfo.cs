using DslaMesh.Controller.Tests.Infrastructure;

// One model folder for the whole assembly; fleet tests time conversions, so they do not share the 2 cores with each other.
[assembly: AssemblyFixture(typeof(ModelFixture))]
[assembly: CollectionBehavior(DisableTestParallelization = true)]

using DslaMesh.Engine.Backends;

namespace DslaMesh.Engine.Tests.Backends;

public sealed class TorchDeterminismTests
{
    [Fact]
    public void Deterministic_algorithms_switch_reaches_LibTorch()
    {
        TorchRuntime.EnsureCpu();
        var settings = TorchDeterminism.Enable(cuda: false);
        Assert.True(settings.DeterministicAlgorithms, "at::Context::setDeterministicAlgorithms was not found in libtorch_cpu.so");
        Assert.True(TorchDeterminism.IsDeterministic());
        Assert.False(settings.MathAttentionOnly);   // CUDA-only switches stay untouched on CPU
    }
}

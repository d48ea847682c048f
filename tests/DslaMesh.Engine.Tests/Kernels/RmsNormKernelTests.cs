using DslaMesh.Engine.Backends;
using DslaMesh.Engine.Kernels;
using DslaMesh.Engine.Models;
using static TorchSharp.torch;

namespace DslaMesh.Engine.Tests.Kernels;

public sealed class RmsNormKernelTests
{
    [Theory]
    [InlineData(ScalarType.BFloat16, 4096, null)]
    [InlineData(ScalarType.Float16, 16384, null)]           // 2048 vectors: 8 per thread, the most
    [InlineData(ScalarType.Float16, 16392, "row size 16392")]
    [InlineData(ScalarType.Float32, 8192, null)]
    [InlineData(ScalarType.Float32, 8196, "row size 8196")]  // 2049 vectors of 4
    [InlineData(ScalarType.BFloat16, 4100, "row size 4100")] // not whole 16-byte vectors
    [InlineData(ScalarType.BFloat16, 4, "row size 4")]
    [InlineData(ScalarType.Float64, 4096, "dtype Float64")]
    public void Widths_and_dtypes_the_kernel_serves(ScalarType dtype, long size, string? expected) =>
        Assert.Equal(expected, RmsNormKernel.UnsupportedShape(dtype, size));

    [Fact]
    public void Reference_is_what_the_model_computes_without_kernels()
    {
        TorchRuntime.EnsureCpu();
        using var scope = NewDisposeScope();
        manual_seed(3);
        using var norm = new RmsNorm(64, 1e-6, ScalarType.Float32, CPU, fused: false);
        norm.Weight.copy_(randn(64));
        var x = randn(2, 5, 64) * 4;

        using var noGrad = no_grad();
        Assert.True(RmsNormKernel.Reference(x, norm.Weight, 1e-6).equal(norm.forward(x)).all().item<bool>());
    }

    [Fact]
    public void Cpu_operands_are_refused_and_cpu_models_never_ask_for_the_kernel()
    {
        TorchRuntime.EnsureCpu();
        using var scope = NewDisposeScope();
        var error = Assert.Throws<ArgumentException>(() => RmsNormKernel.Run(zeros(1, 64), ones(64), 1e-6));
        Assert.Contains("not a CUDA tensor", error.Message, StringComparison.Ordinal);
        Assert.True(LlamaKernelOptions.Default.RmsNormKernel);
        Assert.False(LlamaKernelOptions.Default.On(CPU).RmsNormKernel);
        Assert.False(LlamaKernelOptions.Plain.RmsNormKernel);
        Assert.False(new TorchBackendOptions { DecodeKernels = false }.Kernels.RmsNormKernel);
        using var asked = new RmsNorm(64, 1e-6, ScalarType.Float32, CPU, kernel: true);
        Assert.False(asked.UsesKernel);   // asked for, but on the CPU
    }
}

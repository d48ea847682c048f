using DslaMesh.Engine.Backends;
using TorchSharp;

namespace DslaMesh.Engine.Tests.Backends;

public sealed class TorchRuntimeTests
{
    [Fact]
    public void Cpu_backend_loads_and_computes_on_a_clean_checkout()
    {
        TorchRuntime.EnsureCpu();
        using var scope = torch.NewDisposeScope();
        var a = torch.arange(6, dtype: torch.float32).reshape(2, 3);
        var product = torch.matmul(a, a.t());
        Assert.Equal(new float[] { 5, 14, 14, 50 }, product.data<float>().ToArray());
        var attention = torch.nn.functional.scaled_dot_product_attention(
            torch.ones(1, 1, 2, 4), torch.ones(1, 1, 2, 4), torch.arange(8, dtype: torch.float32).reshape(1, 1, 2, 4), is_casual: true);
        Assert.Equal(new float[] { 0, 1, 2, 3, 2, 3, 4, 5 }, attention.data<float>().ToArray());
    }

    [Fact]
    public void Bridge_library_needs_only_versions_the_host_libstdcxx_defines()
    {
        TorchRuntime.EnsureCpu();
        var path = LibTorchSharpLoader.ResolvedPath;
        Assert.False(string.IsNullOrEmpty(path), "libLibTorchSharp.so was not found beside the test assembly.");
        var available = LibTorchSharpLoader.HostLibStdCxxVersions();
        var unmet = ElfVersionNeeds.ReadNeeds(File.ReadAllBytes(path!))
            .Where(n => n.File.StartsWith("libstdc++", StringComparison.Ordinal) && !n.IsWeak && !available.Contains(n.Version))
            .Select(n => n.Version)
            .ToList();
        Assert.Empty(unmet);
    }
}

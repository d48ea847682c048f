using DslaMesh.Engine.Backends;
using DslaMesh.Engine.Models;
using DslaMesh.Engine.Tests.Dsla;
using static TorchSharp.torch;

namespace DslaMesh.Engine.Tests.Models;

/// <summary>
/// Training (dslactl train) optimises every parameter, so every parameter must receive a gradient through the forward
/// pass the model actually runs, fast-path kernels included: a fused Q/K/V or gate/up product computed from a shared
/// weight that is not itself a parameter leaves the parameters (its views) without gradients, and they silently stay at
/// their initial values.
/// </summary>
public sealed class GradientFlowTests
{
    public static TheoryData<bool> Kernels => new() { true, false };

    [Theory]
    [MemberData(nameof(Kernels))]
    public void Every_parameter_gets_a_gradient(bool fused)
    {
        TorchRuntime.EnsureCpu();
        var config = TinyModels.Config(heads: 2, kvHeads: 1, layers: 2);
        using var model = new LlamaForCausalLM(config, ScalarType.Float32, CPU, kernels: fused ? LlamaKernelOptions.Default : LlamaKernelOptions.Plain);
        model.InitializeRandom(3, std: 0.2);
        foreach (var parameter in model.parameters())
        {
            parameter.requires_grad = true;
        }
        using (var scope = NewDisposeScope())
        {
            using var ids = TinyModels.Ids(2, 12, seed: 4);
            var logits = model.Forward(ids.narrow(1, 0, 11));
            var loss = nn.functional.cross_entropy(logits.reshape(-1, TinyModels.Vocab), ids.narrow(1, 1, 11).reshape(-1));
            loss.backward();
        }
        foreach (var (name, parameter) in model.named_parameters())
        {
            Assert.True(parameter.grad is not null, $"{name} has no gradient ({(fused ? "fused" : "plain")} kernels)");
            using var norm = parameter.grad!.abs().sum();
            Assert.True(norm.item<float>() > 0, $"{name} has a zero gradient");
        }
    }
}

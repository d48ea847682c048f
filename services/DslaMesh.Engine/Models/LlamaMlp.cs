using TorchSharp.Utils;
using static TorchSharp.torch;

namespace DslaMesh.Engine.Models;

/// <summary>Llama's gated feed-forward block: down(silu(gate(x)) · up(x)).</summary>
public sealed class LlamaMlp : nn.Module<Tensor, Tensor>
{
    [ComponentName(Name = "gate_proj")]
    private readonly Projection _gate;
    [ComponentName(Name = "up_proj")]
    private readonly Projection _up;
    [ComponentName(Name = "down_proj")]
    private readonly Projection _down;

    public LlamaMlp(LlamaConfig config, ScalarType dtype, Device device) : base("LlamaMLP")
    {
        _gate = new Projection(config.HiddenSize, config.IntermediateSize, config.MlpBias, dtype, device);
        _up = new Projection(config.HiddenSize, config.IntermediateSize, config.MlpBias, dtype, device);
        _down = new Projection(config.IntermediateSize, config.HiddenSize, config.MlpBias, dtype, device);
        RegisterComponents();
    }

    /// <summary>x [B, T, D] → [B, T, D].</summary>
    public override Tensor forward(Tensor x)
    {
        using var scope = NewDisposeScope();
        return _down.forward(nn.functional.silu(_gate.forward(x)) * _up.forward(x)).MoveToOuterDisposeScope();
    }
}

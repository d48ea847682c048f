using TorchSharp.Utils;
using static TorchSharp.torch;

namespace DslaMesh.Engine.Models;

/// <summary>Llama's gated feed-forward block: down(silu(gate(x)) · up(x)).</summary>
/// <remarks>
/// By default gate and up share one weight (<see cref="FusedLinear"/>) and run as one matrix product; with gradients
/// off, <see cref="AddTo"/> also folds the residual add into the down projection (one GEMM with β = 1).
/// </remarks>
public sealed class LlamaMlp : nn.Module<Tensor, Tensor>
{
    [ComponentName(Name = "gate_proj")]
    private readonly Projection _gate;
    [ComponentName(Name = "up_proj")]
    private readonly Projection _up;
    [ComponentName(Name = "down_proj")]
    private readonly Projection _down;
    private readonly FusedLinear? _gateUp;
    private readonly long _intermediate;
    private readonly long _hidden;
    private readonly bool _gemvKernel;

    public LlamaMlp(LlamaConfig config, ScalarType dtype, Device device, bool fuseProjections = true, bool gemvKernel = false) : base("LlamaMLP")
    {
        ArgumentNullException.ThrowIfNull(config);
        _gemvKernel = gemvKernel;
        _intermediate = config.IntermediateSize;
        _hidden = config.HiddenSize;
        if (fuseProjections)
        {
            _gateUp = new FusedLinear(config.HiddenSize, [config.IntermediateSize, config.IntermediateSize], config.MlpBias, dtype, device);
            (_gate, _up) = (_gateUp.Parts[0], _gateUp.Parts[1]);
        }
        else
        {
            _gate = new Projection(config.HiddenSize, config.IntermediateSize, config.MlpBias, dtype, device);
            _up = new Projection(config.HiddenSize, config.IntermediateSize, config.MlpBias, dtype, device);
        }
        _down = new Projection(config.IntermediateSize, config.HiddenSize, config.MlpBias, dtype, device);
        RegisterComponents();
    }

    /// <summary>x [B, T, D] → [B, T, D].</summary>
    public override Tensor forward(Tensor x)
    {
        using var scope = NewDisposeScope();
        return _down.forward(Activation(x)).MoveToOuterDisposeScope();
    }

    /// <summary>
    /// residual + forward(x), written into <paramref name="residual"/> [B, T, D] (contiguous, owned by the caller) when
    /// gradients are off and the down projection has no bias; otherwise a new tensor. Returns the result. With
    /// <paramref name="norm"/>, x is the norm's input: forward(norm(x)), the norm inside the gate/up launch where the
    /// kernel serves it.
    /// </summary>
    public Tensor AddTo(Tensor residual, Tensor x, RmsNorm? norm = null)
    {
        ArgumentNullException.ThrowIfNull(residual);
        using var scope = NewDisposeScope();
        if (!AddsInPlace || is_grad_enabled() || !residual.is_contiguous())
        {
            return (residual + forward(norm?.forward(x) ?? x)).MoveToOuterDisposeScope();
        }
        var act = Activation(x, norm).view(-1, _intermediate);
        var rows = residual.view(-1, _hidden);
        if (!DecodeProducts.AddInto(_gemvKernel, rows, act, _down.Weight))
        {
            rows.addmm_(act, _down.WeightTransposed);
        }
        return residual;
    }

    /// <summary>Whether <see cref="AddTo"/> can add into the residual in place (fused gate/up, no down bias).</summary>
    internal bool AddsInPlace => _gateUp is not null && _down.Bias is null;

    /// <summary>silu(gate(x)) ⊙ up(x) for x [B, T, D], or for norm(x) when <paramref name="norm"/> is given.</summary>
    private Tensor Activation(Tensor x, RmsNorm? norm = null)
    {
        using var scope = NewDisposeScope();
        var fused = _gateUp is { } weights && weights.IsIntact() ? weights : null;   // gate/up as one product
        if (norm is not null)
        {
            if (fused is not null && DecodeProducts.GatedProduct(_gemvKernel, x, fused.Weight, fused.Bias, norm) is { } normedGated)
            {
                return normedGated.MoveToOuterDisposeScope();
            }
            x = norm.forward(x);
        }
        if (fused is not null)
        {
            if (DecodeProducts.GatedProduct(_gemvKernel, x, fused.Weight, fused.Bias) is { } gated)
            {
                return gated.MoveToOuterDisposeScope();
            }
            var gateUp = fused.Forward(x);
            var act = nn.functional.silu(gateUp.narrow(-1, 0, _intermediate));
            return act.mul_(gateUp.narrow(-1, _intermediate, _intermediate)).MoveToOuterDisposeScope();
        }
        return (nn.functional.silu(_gate.forward(x)) * _up.forward(x)).MoveToOuterDisposeScope();
    }

    /// <inheritdoc/>
    protected override void Dispose(bool disposing)
    {
        if (disposing)
        {
            _gateUp?.Dispose();
        }
        base.Dispose(disposing);
    }
}

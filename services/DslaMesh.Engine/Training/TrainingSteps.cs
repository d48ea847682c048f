using DslaMesh.Engine.Models;
using DslaMesh.Engine.Tokenization;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace DslaMesh.Engine.Training;

/// <summary>
/// The pieces of an optimisation loop that pretraining (<see cref="LanguageModelTrainer"/>) and DSLA distillation
/// (<see cref="Distillation.LayerDistiller"/>) share: the learning-rate schedule, global-norm gradient clipping, corpus
/// encoding and a description of the host for manifests.
/// </summary>
public static class TrainingSteps
{
    /// <summary>
    /// Learning rate for the step about to run (0-based) of a run of <paramref name="totalSteps"/>: linear warmup over
    /// <paramref name="warmupSteps"/> steps, then cosine decay to <paramref name="minRatio"/> · <paramref name="peak"/> at the
    /// last step.
    /// </summary>
    public static double CosineLearningRate(int step, int totalSteps, double peak, int warmupSteps, double minRatio)
    {
        var warmup = Math.Min(warmupSteps, Math.Max(0, totalSteps - 1));
        if (step < warmup)
        {
            return peak * (step + 1) / warmup;
        }
        var progress = totalSteps - warmup <= 1 ? 1.0 : (double)(step - warmup) / (totalSteps - warmup - 1);
        var floor = peak * minRatio;
        return floor + ((peak - floor) * 0.5 * (1 + Math.Cos(Math.PI * Math.Clamp(progress, 0, 1))));
    }

    /// <summary>
    /// Clips the global L2 norm of the gradients to <paramref name="maxNorm"/> on the device (no host sync); returns the
    /// norm before clipping as a one-element tensor. Parameters without a gradient are skipped.
    /// </summary>
    public static Tensor ClipGradients(IReadOnlyList<Parameter> parameters, double maxNorm)
    {
        ArgumentNullException.ThrowIfNull(parameters);
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        var gradients = parameters.Select(p => p.grad).OfType<Tensor>().ToArray();
        if (gradients.Length == 0)
        {
            return zeros(1, dtype: ScalarType.Float32).MoveToOuterDisposeScope();
        }
        var total = stack(gradients.Select(g => g.to(ScalarType.Float32).pow(2).sum()).ToArray()).sum().sqrt();
        var coefficient = total.add(1e-6).reciprocal().mul(maxNorm).clamp_max(1.0);
        foreach (var gradient in gradients)
        {
            gradient.mul_(coefficient.to(gradient.dtype));
        }
        return total.MoveToOuterDisposeScope();
    }

    /// <summary>
    /// Mean next-token cross-entropy (nats) of <paramref name="model"/> over a token stream, with the layers of
    /// <paramref name="dslaLayers"/> running as DSLA (null: all softmax): consecutive windows of
    /// <paramref name="seqLen"/> predictions so every token after the first is predicted exactly once (the last window may
    /// be shorter), <paramref name="batch"/> windows of equal length per pass, at most <paramref name="maxTokens"/>
    /// predictions (0: all). Returns the loss and the number of predicted tokens.
    /// </summary>
    public static (double Loss, long Tokens) HeldOutLoss(LlamaForCausalLM model, int[] stream, int seqLen, int maxTokens, int batch, IReadOnlyList<bool>? dslaLayers = null)
    {
        ArgumentNullException.ThrowIfNull(model);
        ArgumentNullException.ThrowIfNull(stream);
        var windows = TokenWindows.EvaluationWindows(stream.Length, seqLen, maxTokens);
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        var sum = zeros(1, dtype: ScalarType.Float64, device: model.Device);
        long count = 0;
        foreach (var group in windows.GroupBy(w => w.Length).SelectMany(g => g.Chunk(batch)))
        {
            using var inner = NewDisposeScope();
            var length = group[0].Length;
            var ids = new long[group.Length * length];
            for (var row = 0; row < group.Length; row++)
            {
                for (var t = 0; t < length; t++)
                {
                    ids[(row * length) + t] = stream[group[row].Start + t];
                }
            }
            var tokens = tensor(ids, group.Length, length).to(model.Device);
            var logits = model.Forward(tokens.narrow(1, 0, length - 1), null, dslaLayers);
            var loss = nn.functional.cross_entropy(logits.view(-1, logits.shape[^1]), tokens.narrow(1, 1, length - 1).reshape(-1), reduction: nn.Reduction.Sum);
            sum.add_(loss.to(ScalarType.Float64).view(1));
            count += group.Length * (length - 1L);
        }
        return (sum.item<double>() / Math.Max(1, count), count);
    }

    /// <summary>One token stream for a list of documents: each document's ids followed by <paramref name="eos"/>.</summary>
    public static int[] Encode(TextTokenizer tokenizer, IReadOnlyList<string> documents, int eos)
    {
        ArgumentNullException.ThrowIfNull(tokenizer);
        ArgumentNullException.ThrowIfNull(documents);
        var stream = new List<int>();
        foreach (var document in documents)
        {
            stream.AddRange(tokenizer.Encode(document));
            stream.Add(eos);
        }
        return stream.ToArray();
    }

    /// <summary>The CPU's model name from /proc/cpuinfo, or null.</summary>
    public static string? CpuName()
    {
        try
        {
            return File.ReadLines("/proc/cpuinfo").FirstOrDefault(l => l.StartsWith("model name", StringComparison.Ordinal))?.Split(':', 2)[1].Trim();
        }
        catch (IOException)
        {
            return null;
        }
    }
}

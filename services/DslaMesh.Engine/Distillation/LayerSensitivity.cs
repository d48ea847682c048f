using DslaMesh.Engine.Models;
using static TorchSharp.torch;

namespace DslaMesh.Engine.Distillation;

/// <summary>
/// The paper's layer sensitivity (dsla-paper.md §3): the entropy of the last query token's softmax attention
/// distribution, averaged over heads and over held-out windows, measured on the teacher (every layer softmax). Low
/// entropy (concentrated attention) is taken as less sensitive to linearisation, so the conversion order is ascending
/// entropy, ties broken by the lower layer index.
/// </summary>
public static class LayerSensitivity
{
    /// <summary>
    /// Measures every layer's entropy over <paramref name="windows"/> (token ids, all of one length), <paramref name="batch"/>
    /// windows per forward pass, under inference mode.
    /// </summary>
    /// <exception cref="ArgumentException">No windows, or windows of different lengths.</exception>
    public static SensitivityResult Measure(LlamaForCausalLM model, IReadOnlyList<int[]> windows, int batch = 4)
    {
        ArgumentNullException.ThrowIfNull(model);
        ArgumentNullException.ThrowIfNull(windows);
        ArgumentOutOfRangeException.ThrowIfLessThan(batch, 1);
        if (windows.Count == 0)
        {
            throw new ArgumentException("Sensitivity needs at least one window.", nameof(windows));
        }
        var length = windows[0].Length;
        if (length < 1 || windows.Any(w => w.Length != length))
        {
            throw new ArgumentException("Every sensitivity window must have the same, positive length.", nameof(windows));
        }
        var layers = model.Layers.Count;
        var sums = new double[layers];
        using (inference_mode())
        {
            foreach (var group in windows.Chunk(batch))
            {
                using var scope = NewDisposeScope();
                var ids = Batch(group, model.Device);
                using var context = model.CreateContext(ids, null, null);
                var hidden = model.Embed(ids);
                for (var i = 0; i < layers; i++)
                {
                    var decoder = model.Layers[i];
                    // LastTokenEntropy averages over heads and the batch rows; weight by rows to average over windows.
                    sums[i] += decoder.Attention.LastTokenEntropy(decoder.InputNorm.forward(hidden), context) * group.Length;
                    hidden = decoder.Forward(hidden, context);
                }
            }
        }
        var entropy = sums.Select(s => s / windows.Count).ToArray();
        return new SensitivityResult(entropy, OrderOf(entropy), windows.Count, length);
    }

    /// <summary>Layer indices by ascending entropy, ties by ascending index.</summary>
    public static int[] OrderOf(IReadOnlyList<double> entropy)
    {
        ArgumentNullException.ThrowIfNull(entropy);
        return Enumerable.Range(0, entropy.Count).OrderBy(i => entropy[i]).ThenBy(i => i).ToArray();
    }

    /// <summary>
    /// <paramref name="count"/> windows of <paramref name="length"/> tokens spread evenly over a token stream (first at 0,
    /// last at the end); deterministic, so every run measures the same text.
    /// </summary>
    /// <exception cref="ArgumentException">The stream is shorter than one window.</exception>
    public static IReadOnlyList<int[]> EvenlySpacedWindows(int[] stream, int count, int length)
    {
        ArgumentNullException.ThrowIfNull(stream);
        ArgumentOutOfRangeException.ThrowIfLessThan(count, 1);
        ArgumentOutOfRangeException.ThrowIfLessThan(length, 1);
        if (stream.Length < length)
        {
            throw new ArgumentException($"The held-out text has {stream.Length} tokens; a window needs {length}. Use a shorter --seq-len.", nameof(stream));
        }
        var span = stream.Length - length;
        return Enumerable.Range(0, count)
            .Select(i => count == 1 ? 0 : (int)((long)span * i / (count - 1)))
            .Select(start => stream.AsSpan(start, length).ToArray())
            .ToArray();
    }

    /// <summary>Windows (all of one length) as an int64 tensor [B, T] on <paramref name="device"/>.</summary>
    public static Tensor Batch(IReadOnlyList<int[]> rows, Device device)
    {
        ArgumentNullException.ThrowIfNull(rows);
        var length = rows[0].Length;
        var ids = new long[rows.Count * length];
        for (var r = 0; r < rows.Count; r++)
        {
            for (var t = 0; t < length; t++)
            {
                ids[(r * length) + t] = rows[r][t];
            }
        }
        // One native call builds it on the device: no managed host tensor is left for the finaliser mid-copy, as a
        // separate `.to(device)` would.
        return tensor(ids, rows.Count, length, device: device);
    }
}

/// <summary>Per-layer attention entropy and the conversion order it implies.</summary>
/// <param name="Entropy">Mean last-token attention entropy (nats) by layer index.</param>
/// <param name="Order">Layer indices, lowest entropy first.</param>
/// <param name="Samples">Windows averaged over.</param>
/// <param name="SeqLen">Tokens per window.</param>
public sealed record SensitivityResult(IReadOnlyList<double> Entropy, IReadOnlyList<int> Order, int Samples, int SeqLen);

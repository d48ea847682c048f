using System.Security.Cryptography;
using System.Text.Json;
using DslaMesh.Engine.Checkpoints;
using DslaMesh.Engine.Models;
using static TorchSharp.torch;

namespace DslaMesh.Engine.Training;

/// <summary>
/// Writes a trained model as a Hugging Face folder: <c>config.json</c> (model_type llama, rope_parameters form),
/// <c>model.safetensors</c>, <c>generation_config.json</c>. The tokenizer.json and manifest are written by the trainer.
/// </summary>
/// <remarks>
/// Weights are stored as float16: half the bytes of float32, and with 10 mantissa bits (bfloat16 has 7) the rounding
/// error is smaller for weights of this size (|w| ≪ 65504, the float16 maximum, which export checks). The engine
/// loads them into whatever dtype it runs in (float32 on CPU, bfloat16 on CUDA by default).
/// </remarks>
public static class ModelExport
{
    /// <summary>The exported weights' dtype.</summary>
    public const ScalarType WeightsDType = ScalarType.Float16;

    /// <summary>Writes <c>config.json</c> for a Llama config.</summary>
    public static void WriteConfig(string path, LlamaConfig config, string dtype = "float16")
    {
        using var stream = new MemoryStream();
        using (var json = new Utf8JsonWriter(stream, new JsonWriterOptions { Indented = true }))
        {
            json.WriteStartObject();
            json.WriteStartArray("architectures");
            json.WriteStringValue("LlamaForCausalLM");
            json.WriteEndArray();
            json.WriteString("model_type", "llama");
            json.WriteNumber("vocab_size", config.VocabSize);
            json.WriteNumber("hidden_size", config.HiddenSize);
            json.WriteNumber("intermediate_size", config.IntermediateSize);
            json.WriteNumber("num_hidden_layers", config.NumHiddenLayers);
            json.WriteNumber("num_attention_heads", config.NumAttentionHeads);
            json.WriteNumber("num_key_value_heads", config.NumKeyValueHeads);
            json.WriteNumber("head_dim", config.HeadDim);
            json.WriteString("hidden_act", "silu");
            json.WriteNumber("max_position_embeddings", config.MaxPositionEmbeddings);
            json.WriteNumber("rms_norm_eps", config.RmsNormEps);
            json.WriteBoolean("tie_word_embeddings", config.TieWordEmbeddings);
            json.WriteBoolean("attention_bias", config.AttentionBias);
            json.WriteBoolean("mlp_bias", config.MlpBias);
            json.WriteNumber("attention_dropout", 0.0);
            json.WriteNumber("initializer_range", 0.02);
            json.WriteNumber("pretraining_tp", 1);
            json.WriteStartObject("rope_parameters");
            json.WriteString("rope_type", config.Rope.RopeType);
            json.WriteNumber("rope_theta", config.Rope.Theta);
            json.WriteEndObject();
            if (config.BosTokenId is { } bos)
            {
                json.WriteNumber("bos_token_id", bos);
            }
            if (config.EosTokenIds.Count > 0)
            {
                json.WriteNumber("eos_token_id", config.EosTokenIds[0]);
                json.WriteNumber("pad_token_id", config.EosTokenIds[0]);
            }
            json.WriteBoolean("use_cache", true);
            json.WriteString("dtype", dtype);
            json.WriteEndObject();
        }
        stream.WriteByte((byte)'\n');
        File.WriteAllBytes(path, stream.ToArray());
    }

    /// <summary>Writes <c>generation_config.json</c>.</summary>
    public static void WriteGenerationConfig(string path, LlamaConfig config)
    {
        using var stream = new MemoryStream();
        using (var json = new Utf8JsonWriter(stream, new JsonWriterOptions { Indented = true }))
        {
            json.WriteStartObject();
            if (config.BosTokenId is { } bos)
            {
                json.WriteNumber("bos_token_id", bos);
            }
            if (config.EosTokenIds.Count > 0)
            {
                json.WriteNumber("eos_token_id", config.EosTokenIds[0]);
                json.WriteNumber("pad_token_id", config.EosTokenIds[0]);
            }
            json.WriteBoolean("do_sample", true);
            json.WriteNumber("temperature", 0.8);
            json.WriteNumber("top_p", 0.95);
            json.WriteNumber("max_new_tokens", 256);
            json.WriteEndObject();
        }
        stream.WriteByte((byte)'\n');
        File.WriteAllBytes(path, stream.ToArray());
    }

    /// <summary>
    /// Writes weights (HF names → tensors, any dtype/device) as one float16 <c>model.safetensors</c>.
    /// </summary>
    /// <exception cref="InvalidOperationException">A weight is not finite or does not fit float16.</exception>
    public static void WriteWeights(string path, IReadOnlyDictionary<string, Tensor> weights, IReadOnlyDictionary<string, string>? metadata = null)
    {
        using var scope = NewDisposeScope();
        var converted = new List<KeyValuePair<string, Tensor>>();
        foreach (var (name, tensor) in weights)
        {
            var cpu = tensor.detach().to(ScalarType.Float32).cpu();
            var largest = cpu.abs().max().item<float>();
            if (!float.IsFinite(largest) || largest > 65504f)
            {
                throw new InvalidOperationException($"Weight '{name}' has |w| up to {largest}; it cannot be stored as float16.");
            }
            converted.Add(new(name, cpu.to(WeightsDType)));
        }
        var meta = new Dictionary<string, string>(StringComparer.Ordinal) { ["format"] = "pt" };
        if (metadata is not null)
        {
            foreach (var (key, value) in metadata)
            {
                meta[key] = value;
            }
        }
        SafeTensorsFile.Write(path, converted, meta);
    }

    /// <summary>Lower-case hex SHA-256 of a file.</summary>
    public static string Sha256(string path)
    {
        using var stream = File.OpenRead(path);
        return Convert.ToHexStringLower(SHA256.HashData(stream));
    }
}

/// <summary>Seeded initialisation of a model for pretraining, identical on every device.</summary>
public static class ModelInitializer
{
    /// <summary>
    /// Norm scales = 1; every other weight ~ N(0, std²), except the residual output projections (<c>o_proj</c>,
    /// <c>down_proj</c>) ~ N(0, (std / √(2·layers))²), GPT-2's scaling. Values are drawn on the CPU from one generator
    /// seeded with <paramref name="seed"/>, tensor by tensor in ordinal name order, then copied to the model's device,
    /// so CPU and CUDA runs start from the same bits.
    /// </summary>
    public static void Initialize(LlamaForCausalLM model, long seed, double std)
    {
        var residualStd = std / Math.Sqrt(2.0 * model.Config.NumHiddenLayers);
        using var generator = new Generator((ulong)seed, CPU);
        using var noGrad = no_grad();
        foreach (var (name, parameter) in model.CheckpointTensors().OrderBy(kv => kv.Key, StringComparer.Ordinal))
        {
            using var scope = NewDisposeScope();
            if (name.EndsWith("norm.weight", StringComparison.Ordinal))
            {
                parameter.fill_(1.0);
                continue;
            }
            var sigma = name.EndsWith("o_proj.weight", StringComparison.Ordinal) || name.EndsWith("down_proj.weight", StringComparison.Ordinal) ? residualStd : std;
            var values = empty(parameter.shape, ScalarType.Float32, CPU).normal_(0, sigma, generator);
            parameter.copy_(values.to(parameter.dtype, parameter.device));
        }
    }
}

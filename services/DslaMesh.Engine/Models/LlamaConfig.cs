using System.Text.Json;
using System.Text.Json.Serialization;

namespace DslaMesh.Engine.Models;

/// <summary>How rotary position embeddings are scaled (HF <c>rope_scaling</c> / <c>rope_parameters</c>).</summary>
/// <param name="RopeType"><c>default</c> or <c>llama3</c>.</param>
/// <param name="Theta">Base of the rotary frequencies.</param>
/// <param name="Factor">llama3: how much longer the context is than the original.</param>
/// <param name="LowFreqFactor">llama3: wavelengths above original/low are scaled fully.</param>
/// <param name="HighFreqFactor">llama3: wavelengths below original/high are kept.</param>
/// <param name="OriginalMaxPositionEmbeddings">llama3: the context the base model was trained on.</param>
public sealed record RopeSettings(
    string RopeType,
    double Theta,
    double Factor = 1.0,
    double LowFreqFactor = 1.0,
    double HighFreqFactor = 4.0,
    int OriginalMaxPositionEmbeddings = 8192);

/// <summary>
/// A Llama-family model's architecture, read from a Hugging Face <c>config.json</c> in either form found in the wild
/// (<c>rope_theta</c> + <c>rope_scaling</c>, or the newer <c>rope_parameters</c>).
/// </summary>
public sealed record LlamaConfig
{
    public required int VocabSize { get; init; }
    public required int HiddenSize { get; init; }
    public required int IntermediateSize { get; init; }
    public required int NumHiddenLayers { get; init; }
    public required int NumAttentionHeads { get; init; }
    public required int NumKeyValueHeads { get; init; }
    public required int HeadDim { get; init; }
    public double RmsNormEps { get; init; } = 1e-6;
    public int MaxPositionEmbeddings { get; init; } = 4096;
    public bool TieWordEmbeddings { get; init; }
    public bool AttentionBias { get; init; }
    public bool MlpBias { get; init; }
    public required RopeSettings Rope { get; init; }
    public int? BosTokenId { get; init; }
    public IReadOnlyList<int> EosTokenIds { get; init; } = [];
    /// <summary>The checkpoint's declared dtype (<c>torch_dtype</c> or <c>dtype</c>), if any.</summary>
    public string? DeclaredDType { get; init; }

    /// <summary>Query heads per key/value head.</summary>
    public int GroupSize => NumAttentionHeads / NumKeyValueHeads;

    /// <summary>Reads and validates <c>config.json</c>.</summary>
    /// <exception cref="ModelLoadException">Missing file, malformed JSON, unsupported architecture or inconsistent sizes.</exception>
    public static LlamaConfig Load(string path)
    {
        if (!File.Exists(path))
        {
            throw new ModelLoadException($"Model config not found: '{path}'.");
        }
        RawConfig raw;
        try
        {
            raw = JsonSerializer.Deserialize(File.ReadAllText(path), LlamaConfigJsonContext.Default.RawConfig)
                ?? throw new ModelLoadException($"'{path}' is empty.");
        }
        catch (JsonException e)
        {
            throw new ModelLoadException($"'{path}' is not valid JSON: {e.Message}", e);
        }
        return FromRaw(raw, path);
    }

    /// <summary>Parses config JSON text (for tests and embedded configs).</summary>
    public static LlamaConfig Parse(string json, string source = "config.json")
    {
        RawConfig raw;
        try
        {
            raw = JsonSerializer.Deserialize(json, LlamaConfigJsonContext.Default.RawConfig)
                ?? throw new ModelLoadException($"'{source}' is empty.");
        }
        catch (JsonException e)
        {
            throw new ModelLoadException($"'{source}' is not valid JSON: {e.Message}", e);
        }
        return FromRaw(raw, source);
    }

    private static LlamaConfig FromRaw(RawConfig raw, string source)
    {
        var architecture = raw.Architectures?.FirstOrDefault();
        if (raw.ModelType is { } type && type != "llama")
        {
            throw new ModelLoadException($"'{source}': model_type '{type}' is not supported; DslaMesh serves Llama-family models (model_type 'llama').");
        }
        if (architecture is not null && architecture != "LlamaForCausalLM")
        {
            throw new ModelLoadException($"'{source}': architecture '{architecture}' is not supported; expected 'LlamaForCausalLM'.");
        }
        if (raw.HiddenAct is { } act && act != "silu")
        {
            throw new ModelLoadException($"'{source}': hidden_act '{act}' is not supported; Llama uses 'silu'.");
        }
        int Required(int? value, string name) => value is > 0 ? value.Value
            : throw new ModelLoadException($"'{source}': '{name}' is missing or not a positive integer.");

        var hidden = Required(raw.HiddenSize, "hidden_size");
        var heads = Required(raw.NumAttentionHeads, "num_attention_heads");
        var kvHeads = raw.NumKeyValueHeads ?? heads;
        if (kvHeads <= 0 || heads % kvHeads != 0)
        {
            throw new ModelLoadException($"'{source}': num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kvHeads}).");
        }
        var headDim = raw.HeadDim ?? (hidden % heads == 0 ? hidden / heads
            : throw new ModelLoadException($"'{source}': hidden_size ({hidden}) is not divisible by num_attention_heads ({heads}) and head_dim is not given."));

        return new LlamaConfig
        {
            VocabSize = Required(raw.VocabSize, "vocab_size"),
            HiddenSize = hidden,
            IntermediateSize = Required(raw.IntermediateSize, "intermediate_size"),
            NumHiddenLayers = Required(raw.NumHiddenLayers, "num_hidden_layers"),
            NumAttentionHeads = heads,
            NumKeyValueHeads = kvHeads,
            HeadDim = headDim,
            RmsNormEps = raw.RmsNormEps ?? 1e-6,
            MaxPositionEmbeddings = raw.MaxPositionEmbeddings ?? 4096,
            TieWordEmbeddings = raw.TieWordEmbeddings ?? false,
            AttentionBias = raw.AttentionBias ?? false,
            MlpBias = raw.MlpBias ?? false,
            Rope = ReadRope(raw, source),
            BosTokenId = raw.BosTokenId,
            EosTokenIds = ReadTokenIds(raw.EosTokenId),
            DeclaredDType = raw.TorchDType ?? raw.DType,
        };
    }

    private static RopeSettings ReadRope(RawConfig raw, string source)
    {
        // Newer transformers write everything under rope_parameters (theta included); older ones split it.
        var parameters = raw.RopeParameters ?? raw.RopeScaling;
        var theta = parameters?.RopeTheta ?? raw.RopeTheta ?? 10000.0;
        var type = parameters?.RopeType ?? parameters?.Type ?? "default";
        return type switch
        {
            "default" => new RopeSettings("default", theta),
            "llama3" => new RopeSettings(
                "llama3",
                theta,
                parameters!.Factor ?? throw new ModelLoadException($"'{source}': llama3 rope scaling needs 'factor'."),
                parameters.LowFreqFactor ?? 1.0,
                parameters.HighFreqFactor ?? 4.0,
                parameters.OriginalMaxPositionEmbeddings ?? 8192),
            _ => throw new ModelLoadException($"'{source}': rope type '{type}' is not supported (supported: default, llama3)."),
        };
    }

    private static int[] ReadTokenIds(JsonElement? element) => element switch
    {
        { ValueKind: JsonValueKind.Number } e => [e.GetInt32()],
        { ValueKind: JsonValueKind.Array } e => e.EnumerateArray().Select(x => x.GetInt32()).ToArray(),
        _ => [],
    };

    /// <summary>The JSON shape of config.json (only the keys the engine reads).</summary>
    internal sealed class RawConfig
    {
        [JsonPropertyName("architectures")] public List<string>? Architectures { get; set; }
        [JsonPropertyName("model_type")] public string? ModelType { get; set; }
        [JsonPropertyName("vocab_size")] public int? VocabSize { get; set; }
        [JsonPropertyName("hidden_size")] public int? HiddenSize { get; set; }
        [JsonPropertyName("intermediate_size")] public int? IntermediateSize { get; set; }
        [JsonPropertyName("num_hidden_layers")] public int? NumHiddenLayers { get; set; }
        [JsonPropertyName("num_attention_heads")] public int? NumAttentionHeads { get; set; }
        [JsonPropertyName("num_key_value_heads")] public int? NumKeyValueHeads { get; set; }
        [JsonPropertyName("head_dim")] public int? HeadDim { get; set; }
        [JsonPropertyName("hidden_act")] public string? HiddenAct { get; set; }
        [JsonPropertyName("rms_norm_eps")] public double? RmsNormEps { get; set; }
        [JsonPropertyName("max_position_embeddings")] public int? MaxPositionEmbeddings { get; set; }
        [JsonPropertyName("tie_word_embeddings")] public bool? TieWordEmbeddings { get; set; }
        [JsonPropertyName("attention_bias")] public bool? AttentionBias { get; set; }
        [JsonPropertyName("mlp_bias")] public bool? MlpBias { get; set; }
        [JsonPropertyName("rope_theta")] public double? RopeTheta { get; set; }
        [JsonPropertyName("rope_scaling")] public RawRope? RopeScaling { get; set; }
        [JsonPropertyName("rope_parameters")] public RawRope? RopeParameters { get; set; }
        [JsonPropertyName("bos_token_id")] public int? BosTokenId { get; set; }
        [JsonPropertyName("eos_token_id")] public JsonElement? EosTokenId { get; set; }
        [JsonPropertyName("torch_dtype")] public string? TorchDType { get; set; }
        [JsonPropertyName("dtype")] public string? DType { get; set; }
    }

    /// <summary>The JSON shape of rope_scaling / rope_parameters.</summary>
    internal sealed class RawRope
    {
        [JsonPropertyName("rope_type")] public string? RopeType { get; set; }
        [JsonPropertyName("type")] public string? Type { get; set; }
        [JsonPropertyName("rope_theta")] public double? RopeTheta { get; set; }
        [JsonPropertyName("factor")] public double? Factor { get; set; }
        [JsonPropertyName("low_freq_factor")] public double? LowFreqFactor { get; set; }
        [JsonPropertyName("high_freq_factor")] public double? HighFreqFactor { get; set; }
        [JsonPropertyName("original_max_position_embeddings")] public int? OriginalMaxPositionEmbeddings { get; set; }
    }
}

/// <summary>Source-generated JSON metadata for <see cref="LlamaConfig"/>.</summary>
[JsonSourceGenerationOptions(ReadCommentHandling = JsonCommentHandling.Skip, AllowTrailingCommas = true, NumberHandling = JsonNumberHandling.AllowReadingFromString)]
[JsonSerializable(typeof(LlamaConfig.RawConfig))]
internal sealed partial class LlamaConfigJsonContext : JsonSerializerContext;

/// <summary>A checkpoint could not be loaded; the message names the file and, where relevant, the tensor.</summary>
public sealed class ModelLoadException : Exception
{
    public ModelLoadException(string message) : base(message) { }
    public ModelLoadException(string message, Exception inner) : base(message, inner) { }
    public ModelLoadException() { }
}

using DslaMesh.Engine.Backends;
using DslaMesh.Engine.Models;
using static TorchSharp.torch;

namespace DslaMesh.Engine.Tests.Models;

public sealed class CheckpointErrorTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("dslamesh-ckpt-").FullName;

    [Fact]
    public void Missing_folder_is_named()
    {
        var error = Assert.Throws<ModelLoadException>(() => LlamaForCausalLM.Load(Path.Combine(_dir, "nope"), ScalarType.Float32, TorchRuntime.EnsureCpu()));
        Assert.Contains("nope", error.Message);
    }

    [Fact]
    public void Missing_tensor_is_named_with_the_file()
    {
        CopyFixture("llama-gqa-untied");
        // A header that lists one tensor fewer: rewrite the file without lm_head.weight.
        var path = Path.Combine(_dir, "model.safetensors");
        using (var file = DslaMesh.Engine.Checkpoints.SafeTensorsFile.Open(path))
        {
            var kept = file.Entries.Keys.Where(k => k != "lm_head.weight").ToDictionary(k => k, file.Read);
            file.Dispose();
            DslaMesh.Engine.Checkpoints.SafeTensorsFile.Write(path, kept);
        }
        var error = Assert.Throws<ModelLoadException>(() => LlamaForCausalLM.Load(_dir, ScalarType.Float32, TorchRuntime.EnsureCpu()));
        Assert.Contains("lm_head.weight", error.Message);
    }

    [Fact]
    public void Wrong_shape_names_tensor_and_both_shapes()
    {
        CopyFixture("llama-gqa-untied");
        var configPath = Path.Combine(_dir, "config.json");
        File.WriteAllText(configPath, File.ReadAllText(configPath).Replace("\"intermediate_size\": 160", "\"intermediate_size\": 128", StringComparison.Ordinal));
        var error = Assert.Throws<ModelLoadException>(() => LlamaForCausalLM.Load(_dir, ScalarType.Float32, TorchRuntime.EnsureCpu()));
        Assert.Contains("mlp", error.Message);
        Assert.Contains("160", error.Message);
        Assert.Contains("128", error.Message);
    }

    [Fact]
    public void Truncated_weights_file_is_reported()
    {
        CopyFixture("llama-gqa-untied");
        var path = Path.Combine(_dir, "model.safetensors");
        var bytes = File.ReadAllBytes(path);
        File.WriteAllBytes(path, bytes[..(bytes.Length / 2)]);
        var error = Assert.Throws<ModelLoadException>(() => LlamaForCausalLM.Load(_dir, ScalarType.Float32, TorchRuntime.EnsureCpu()));
        Assert.Contains("model.safetensors", error.Message);
    }

    [Fact]
    public void Malformed_config_and_unsupported_architecture_are_explained()
    {
        CopyFixture("llama-gqa-untied");
        var configPath = Path.Combine(_dir, "config.json");
        File.WriteAllText(configPath, "{ not json");
        Assert.Contains("not valid JSON", Assert.Throws<ModelLoadException>(() => LlamaConfig.Load(configPath)).Message);
        File.WriteAllText(configPath, """{"architectures":["MistralForCausalLM"],"model_type":"mistral","hidden_size":8}""");
        Assert.Contains("mistral", Assert.Throws<ModelLoadException>(() => LlamaConfig.Load(configPath)).Message);
        File.WriteAllText(configPath, """{"model_type":"llama","hidden_size":8,"num_attention_heads":2}""");
        Assert.Contains("vocab_size", Assert.Throws<ModelLoadException>(() => LlamaConfig.Load(configPath)).Message);
    }

    [Fact]
    public void Both_config_forms_read_the_same_rope_settings()
    {
        var modern = LlamaConfig.Parse("""{"model_type":"llama","vocab_size":8,"hidden_size":8,"intermediate_size":8,"num_hidden_layers":1,"num_attention_heads":2,"rope_parameters":{"rope_type":"llama3","rope_theta":500000.0,"factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":8192}}""");
        var legacy = LlamaConfig.Parse("""{"model_type":"llama","vocab_size":8,"hidden_size":8,"intermediate_size":8,"num_hidden_layers":1,"num_attention_heads":2,"rope_theta":500000.0,"rope_scaling":{"type":"llama3","factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":8192}}""");
        Assert.Equal(modern.Rope, legacy.Rope);
        Assert.Equal(2, modern.NumKeyValueHeads);
        Assert.Equal(4, modern.HeadDim);
    }

    private void CopyFixture(string name)
    {
        foreach (var file in Directory.GetFiles(Fixtures.Llama(name)))
        {
            File.Copy(file, Path.Combine(_dir, Path.GetFileName(file)), overwrite: true);
        }
    }

    public void Dispose() => Directory.Delete(_dir, recursive: true);
}

using System.ComponentModel.DataAnnotations;
using DslaMesh.Engine.Backends;
using DslaMesh.Engine.Serving;
using Microsoft.Extensions.Options;

namespace DslaMesh.ModelService.Hosting;

/// <summary>Configuration of one model service (section <c>ModelService</c>).</summary>
public sealed class ModelServiceOptions
{
    /// <summary>Configuration section name.</summary>
    public const string SectionName = "ModelService";

    /// <summary>Model folder (config.json, safetensors, tokenizer.json, optional DSLA weights and manifest).</summary>
    /// <remarks>Default: the default model shipped with the service (<c>models/default</c> beside the executable).</remarks>
    [Required]
    public string ModelPath { get; set; } = Path.Combine(AppContext.BaseDirectory, "models", "default");

    /// <summary>The name clients use in requests (OpenAI <c>model</c>).</summary>
    /// <remarks>Default: the model folder's name.</remarks>
    public string? ModelName { get; set; }

    /// <summary>Unique id of this replica in the fleet.</summary>
    /// <remarks>Default: host name and port.</remarks>
    public string? ServiceId { get; set; }

    /// <summary>The address other components reach this service at (registered in Redis).</summary>
    /// <remarks>Default: the <c>Kestrel:Endpoints:Http</c> URL.</remarks>
    public string? AdvertisedAddress { get; set; }

    /// <summary>
    /// Which distilled variant to attach for live conversion (<c>dsla-foldable</c> folds in-flight KV caches exactly;
    /// <c>dsla</c> and <c>gla</c> convert only new sequences).
    /// </summary>
    /// <remarks>Default value is <c>dsla-foldable</c>.</remarks>
    [RegularExpression("^(dsla|dsla-foldable|gla)$")]
    public string DslaVariant { get; set; } = "dsla-foldable";

    /// <summary>The gRPC address other components use (registered in Redis).</summary>
    /// <remarks>Default: the <c>Kestrel:Endpoints:Grpc</c> URL.</remarks>
    public string? AdvertisedGrpcAddress { get; set; }

    /// <summary>Longest sequence (prompt + generated) served; 0 = the model's max_position_embeddings.</summary>
    [Range(0, 1 << 20)]
    public int MaxContextTokens { get; set; }

    /// <summary>How long shutdown waits for in-flight streams.</summary>
    /// <remarks>Default value is 30 seconds.</remarks>
    [Range(typeof(TimeSpan), "00:00:00", "01:00:00")]
    public TimeSpan DrainTimeout { get; set; } = TimeSpan.FromSeconds(30);

    /// <summary>Largest accepted HTTP request body, in bytes.</summary>
    /// <remarks>Default value is 4 MiB.</remarks>
    [Range(1024, 256L << 20)]
    public long MaxRequestBodyBytes { get; set; } = 4 << 20;

    /// <summary>The device and dtype.</summary>
    [ValidateObjectMembers]
    public TorchBackendOptions Backend { get; set; } = new();

    /// <summary>Batching and memory limits.</summary>
    [ValidateObjectMembers]
    public ServingEngineOptions Engine { get; set; } = new();
}

/// <summary>Validates <see cref="ModelServiceOptions"/> at start.</summary>
[OptionsValidator]
public sealed partial class ModelServiceOptionsValidator : IValidateOptions<ModelServiceOptions>;

using System.ComponentModel.DataAnnotations;
using Microsoft.Extensions.Options;

namespace DslaMesh.Gateway.Hosting;

/// <summary>Where the fleet registry lives and how often the gateway re-reads it (section <c>Redis</c>).</summary>
public sealed class RedisOptions
{
    /// <summary>Configuration section name.</summary>
    public const string SectionName = "Redis";

    /// <summary>StackExchange.Redis configuration string.</summary>
    /// <remarks>Default value is <c>127.0.0.1:6379</c>.</remarks>
    [Required]
    public string Configuration { get; set; } = "127.0.0.1:6379";

    /// <summary>Key prefix shared by the fleet.</summary>
    /// <remarks>Default value is <c>dslamesh</c>.</remarks>
    [Required]
    [RegularExpression("^[A-Za-z0-9_.-]+$")]
    public string Prefix { get; set; } = "dslamesh";

    /// <summary>
    /// How often the registry is re-read. Metrics arrive by pub/sub as they are published; a metrics message from an
    /// unknown replica triggers a re-read at once, so new replicas are routed to within about one publish period.
    /// </summary>
    /// <remarks>Default value is 1 second.</remarks>
    [Range(typeof(TimeSpan), "00:00:00.050", "00:10:00")]
    public TimeSpan PollInterval { get; set; } = TimeSpan.FromSeconds(1);
}

/// <summary>Validates <see cref="RedisOptions"/> at start.</summary>
[OptionsValidator]
public sealed partial class RedisOptionsValidator : IValidateOptions<RedisOptions>;

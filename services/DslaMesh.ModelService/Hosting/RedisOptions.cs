using System.ComponentModel.DataAnnotations;
using Microsoft.Extensions.Options;

namespace DslaMesh.ModelService.Hosting;

/// <summary>Where the fleet registry lives and how often this service reports (section <c>Redis</c>).</summary>
public sealed class RedisOptions
{
    /// <summary>Configuration section name.</summary>
    public const string SectionName = "Redis";

    /// <summary>StackExchange.Redis configuration string; empty disables registration and metrics publishing.</summary>
    /// <remarks>Default value is <c>127.0.0.1:6379</c>.</remarks>
    public string Configuration { get; set; } = "127.0.0.1:6379";

    /// <summary>Key prefix shared by the fleet.</summary>
    /// <remarks>Default value is <c>dslamesh</c>.</remarks>
    [Required]
    [RegularExpression("^[A-Za-z0-9_.-]+$")]
    public string Prefix { get; set; } = "dslamesh";

    /// <summary>How often metrics are published and the registration refreshed.</summary>
    /// <remarks>Default value is 1 second.</remarks>
    [Range(typeof(TimeSpan), "00:00:00.050", "00:10:00")]
    public TimeSpan PublishPeriod { get; set; } = TimeSpan.FromSeconds(1);

    /// <summary>Registration lifetime without a heartbeat.</summary>
    /// <remarks>Default value is 5 seconds.</remarks>
    [Range(typeof(TimeSpan), "00:00:01", "01:00:00")]
    public TimeSpan RegistrationTtl { get; set; } = TimeSpan.FromSeconds(5);
}

/// <summary>Validates <see cref="RedisOptions"/> at start.</summary>
[OptionsValidator]
public sealed partial class RedisOptionsValidator : IValidateOptions<RedisOptions>;

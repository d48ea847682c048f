using System.ComponentModel.DataAnnotations;
using Microsoft.Extensions.Options;

namespace DslaMesh.Controller.Hosting;

/// <summary>Configuration of the controller (section <c>Controller</c>).</summary>
public sealed class ControllerOptions
{
    /// <summary>Configuration section name.</summary>
    public const string SectionName = "Controller";

    /// <summary>The environment variable read when <see cref="AdminToken"/> is not configured.</summary>
    public const string TokenVariable = "DSLAMESH_ADMIN_TOKEN";

    /// <summary>This controller's id (leader lease holder, command issuer).</summary>
    /// <remarks>Default: host name, process id and a random suffix.</remarks>
    [RegularExpression("^[A-Za-z0-9_.:-]+$")]
    public string? Id { get; set; }

    /// <summary>The admin API's bearer token (at least 16 characters).</summary>
    /// <remarks>Default: the <c>DSLAMESH_ADMIN_TOKEN</c> environment variable; the controller does not start without one.</remarks>
    [Required(ErrorMessage = "Controller:AdminToken (or the DSLAMESH_ADMIN_TOKEN environment variable) is required: the admin API is never open.")]
    [MinLength(16)]
    public string? AdminToken { get; set; }

    /// <summary>How often metrics are read and decisions made.</summary>
    /// <remarks>Default value is 250 ms.</remarks>
    [Range(typeof(TimeSpan), "00:00:00.010", "00:01:00")]
    public TimeSpan TickPeriod { get; set; } = TimeSpan.FromMilliseconds(250);

    /// <summary>First delay before reconnecting a control stream (then doubling, with jitter).</summary>
    /// <remarks>Default value is 200 ms.</remarks>
    [Range(typeof(TimeSpan), "00:00:00.010", "00:01:00")]
    public TimeSpan ReconnectDelay { get; set; } = TimeSpan.FromMilliseconds(200);

    /// <summary>Longest delay between reconnect attempts.</summary>
    /// <remarks>Default value is 5 seconds.</remarks>
    [Range(typeof(TimeSpan), "00:00:00.010", "00:10:00")]
    public TimeSpan MaxReconnectDelay { get; set; } = TimeSpan.FromSeconds(5);

    /// <summary>Leader lease lifetime: a controller that stops renewing loses the right to issue epochs after this.</summary>
    /// <remarks>Default value is 5 seconds.</remarks>
    [Range(typeof(TimeSpan), "00:00:00.200", "00:05:00")]
    public TimeSpan LeaseTtl { get; set; } = TimeSpan.FromSeconds(5);

    /// <summary>How long a service that left the registry keeps its control stream (covers Redis restarts).</summary>
    /// <remarks>Default value is 15 seconds.</remarks>
    [Range(typeof(TimeSpan), "00:00:00", "01:00:00")]
    public TimeSpan ServiceGracePeriod { get; set; } = TimeSpan.FromSeconds(15);

    /// <summary>How long a manual <c>convert</c> pins its layers when the request gives no hold time.</summary>
    /// <remarks>Default value is 5 minutes.</remarks>
    [Range(typeof(TimeSpan), "00:00:01", "7.00:00:00")]
    public TimeSpan DefaultPinDuration { get; set; } = TimeSpan.FromMinutes(5);

    /// <summary>How long an admin <c>convert</c> waits for the service to apply it.</summary>
    /// <remarks>Default value is 10 seconds.</remarks>
    [Range(typeof(TimeSpan), "00:00:00.100", "00:10:00")]
    public TimeSpan CommandTimeout { get; set; } = TimeSpan.FromSeconds(10);

    /// <summary>Policy versions kept in the history list.</summary>
    /// <remarks>Default value is 100.</remarks>
    [Range(2, 100_000)]
    public int HistoryLimit { get; set; } = 100;
}

/// <summary>Validates <see cref="ControllerOptions"/> at start.</summary>
[OptionsValidator]
public sealed partial class ControllerOptionsValidator : IValidateOptions<ControllerOptions>;

/// <summary>Where the fleet registry lives (section <c>Redis</c>, shared with the model services).</summary>
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

    /// <summary>Timeout of one Redis command; while Redis is down each tick gives up after this and the fleet is held.</summary>
    /// <remarks>Default value is 1 second.</remarks>
    [Range(typeof(TimeSpan), "00:00:00.050", "00:01:00")]
    public TimeSpan CommandTimeout { get; set; } = TimeSpan.FromSeconds(1);
}

/// <summary>Validates <see cref="RedisOptions"/> at start.</summary>
[OptionsValidator]
public sealed partial class RedisOptionsValidator : IValidateOptions<RedisOptions>;

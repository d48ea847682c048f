namespace DslaMesh.Controller.Hosting;

/// <summary>Redis keys the controller owns (the fleet's own layout is <see cref="DslaMesh.Fleet.FleetKeys"/>).</summary>
public static class ControllerKeys
{
    /// <summary>The policy in force (normalised JSON with its version).</summary>
    public static string PolicyCurrent(string prefix) => $"{prefix}:policy:current";

    /// <summary>Every policy version (list of JSON entries, oldest first).</summary>
    public static string PolicyHistory(string prefix) => $"{prefix}:policy:history";

    /// <summary>The last policy version number handed out.</summary>
    public static string PolicyVersion(string prefix) => $"{prefix}:policy:version";

    /// <summary>The leader lease: the id of the one controller allowed to issue epochs.</summary>
    public static string Leader(string prefix) => $"{prefix}:controller:leader";

    /// <summary>The last conversion epoch issued to a service.</summary>
    public static string Epoch(string prefix, string serviceId) => $"{prefix}:epoch:{serviceId}";

    /// <summary>The controller's decision state for a service (policy layers, cooldown, pins, desired layers).</summary>
    public static string State(string prefix, string serviceId) => $"{prefix}:controller:state:{serviceId}";
}

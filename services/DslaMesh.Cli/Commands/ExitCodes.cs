namespace DslaMesh.Cli.Commands;

/// <summary>dslactl's exit codes.</summary>
public static class ExitCodes
{
    /// <summary>Success.</summary>
    public const int Ok = 0;
    /// <summary><c>policy diff</c>: the policies differ (like diff(1)).</summary>
    public const int Different = 1;
    /// <summary>Bad arguments or input values.</summary>
    public const int InvalidInput = 2;
    /// <summary>The model, checkpoint or tokenizer could not be loaded.</summary>
    public const int ModelError = 3;
    /// <summary>A service could not be reached or answered with an error.</summary>
    public const int ServiceError = 4;
    /// <summary>The admin token is missing or wrong.</summary>
    public const int Unauthenticated = 5;
    /// <summary>The service, policy version or other thing named does not exist.</summary>
    public const int NotFound = 6;
    /// <summary>Training data missing or unreadable, or the device/output could not be used.</summary>
    public const int DataError = 7;
    /// <summary>Cancelled with Ctrl-C.</summary>
    public const int Cancelled = 130;
}

namespace DslaMesh.Cli.Commands;

/// <summary>dslactl's exit codes.</summary>
public static class ExitCodes
{
    /// <summary>Success.</summary>
    public const int Ok = 0;
    /// <summary>Bad arguments or input values.</summary>
    public const int InvalidInput = 2;
    /// <summary>The model, checkpoint or tokenizer could not be loaded.</summary>
    public const int ModelError = 3;
    /// <summary>A service could not be reached or answered with an error.</summary>
    public const int ServiceError = 4;
    /// <summary>Training data missing or unreadable, or the device/output could not be used.</summary>
    public const int DataError = 5;
    /// <summary>Cancelled with Ctrl-C.</summary>
    public const int Cancelled = 130;
}

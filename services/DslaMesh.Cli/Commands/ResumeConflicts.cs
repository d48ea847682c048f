using System.CommandLine;
using System.Globalization;

namespace DslaMesh.Cli.Commands;

/// <summary>
/// Collects the options given explicitly on a <c>--resume</c> command line that disagree with the checkpoint's recipe,
/// so a resumed run never silently changes what it trains.
/// </summary>
public sealed class ResumeConflicts
{
    private readonly HashSet<string> _explicitOptions;
    private readonly List<string> _conflicts = [];

    public ResumeConflicts(HashSet<string> explicitOptions) => _explicitOptions = explicitOptions;

    /// <summary>The names of the options the user typed (not defaulted).</summary>
    public static HashSet<string> ExplicitOptions(ParseResult result, IEnumerable<Option> options) =>
        options.Where(o => result.GetResult(o) is { Implicit: false }).Select(o => o.Name).ToHashSet(StringComparer.Ordinal);

    /// <summary>Records a conflict when <paramref name="name"/> was given explicitly with another value than the checkpoint's.</summary>
    public void Check<T>(string name, T asked, T had)
    {
        if (_explicitOptions.Contains(name) && !EqualityComparer<T>.Default.Equals(asked, had))
        {
            _conflicts.Add(string.Create(CultureInfo.InvariantCulture, $"{name} {asked} (checkpoint: {had})"));
        }
    }

    /// <summary>Throws, naming every conflicting option, when there is any.</summary>
    public void ThrowIfAny(string checkpoint)
    {
        if (_conflicts.Count > 0)
        {
            throw new ArgumentException($"--resume continues {checkpoint}'s recipe; these options disagree with it: {string.Join(", ", _conflicts)}.");
        }
    }
}

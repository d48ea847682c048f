namespace DslaMesh.Tests.Common;

/// <summary>Paths inside the repository checkout, whatever folder the test runner starts in.</summary>
public static class RepoPaths
{
    /// <summary>The repository root (the folder holding DslaMesh.sln).</summary>
    public static string Root { get; } = FindRoot();

    /// <summary>tests/fixtures.</summary>
    public static string Fixtures => Path.Combine(Root, "tests", "fixtures");

    /// <summary>A Llama fixture folder made by tests/fixtures/make_llama_fixtures.py.</summary>
    public static string LlamaFixture(string name) => Path.Combine(Fixtures, "llama", name);

    private static string FindRoot()
    {
        for (var dir = new DirectoryInfo(AppContext.BaseDirectory); dir is not null; dir = dir.Parent)
        {
            if (File.Exists(Path.Combine(dir.FullName, "DslaMesh.sln")))
            {
                return dir.FullName;
            }
        }
        throw new DirectoryNotFoundException("DslaMesh.sln not found above the test assembly; run the tests from a checkout of the repository.");
    }
}

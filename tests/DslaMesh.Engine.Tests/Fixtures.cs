namespace DslaMesh.Engine.Tests;

/// <summary>Locates files committed under tests/fixtures, whatever folder the test runner starts in.</summary>
internal static class Fixtures
{
    public static string Root { get; } = FindRoot();

    public static string Llama(string name) => Path.Combine(Root, "llama", name);

    public static readonly string[] LlamaModels = ["llama-gqa-untied", "llama-tied-llama3-legacy", "llama-bf16-sharded", "llama-fp16"];

    private static string FindRoot()
    {
        for (var dir = new DirectoryInfo(AppContext.BaseDirectory); dir is not null; dir = dir.Parent)
        {
            var candidate = Path.Combine(dir.FullName, "tests", "fixtures");
            if (Directory.Exists(candidate))
            {
                return candidate;
            }
        }
        throw new DirectoryNotFoundException("tests/fixtures not found above the test assembly; run the tests from a checkout of the repository.");
    }
}

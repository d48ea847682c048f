namespace DslaMesh.Engine.Training;

/// <summary>Swaps a fully written checkpoint folder into place, so a crash mid-write never leaves a torn checkpoint.</summary>
public static class CheckpointFolders
{
    /// <summary>
    /// Replaces <paramref name="directory"/> with <paramref name="written"/>: the old folder moves aside to
    /// <c>directory.old</c>, the new one moves in, then the old one is deleted.
    /// </summary>
    public static void Commit(string written, string directory)
    {
        var old = directory + ".old";
        if (Directory.Exists(old))
        {
            Directory.Delete(old, recursive: true);
        }
        if (Directory.Exists(directory))
        {
            Directory.Move(directory, old);
        }
        Directory.Move(written, directory);
        if (Directory.Exists(old))
        {
            Directory.Delete(old, recursive: true);
        }
    }
}

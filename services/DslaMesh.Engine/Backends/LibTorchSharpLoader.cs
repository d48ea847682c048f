using System.Runtime.InteropServices;

namespace DslaMesh.Engine.Backends;

/// <summary>
/// Makes TorchSharp's native bridge (<c>libLibTorchSharp.so</c>) loadable on hosts whose libstdc++ is older than the
/// one it was linked against, with no manual step and no root.
/// </summary>
/// <remarks>
/// The fix is the one recorded in BRIEF.md: every version the bridge needs from libstdc++ that the process's
/// libstdc++ does not define is marked weak. The library is rewritten next to itself (write a temporary file, then
/// rename, so concurrent starts and hard-linked NuGet caches are safe). Where the application folder is read-only,
/// a patched copy goes to a per-user cache and a DllImport resolver points TorchSharp at it.
/// </remarks>
public static class LibTorchSharpLoader
{
    private const string LibraryFile = "libLibTorchSharp.so";
    private static readonly Lock Gate = new();
    private static string? _resolvedPath;

    /// <summary>The path of the bridge library that will be loaded, once <see cref="EnsureLoadable"/> ran.</summary>
    public static string? ResolvedPath => _resolvedPath;

    /// <summary>Versions patched to weak by the last call, for diagnostics.</summary>
    public static IReadOnlyList<string> PatchedVersions { get; private set; } = [];

    /// <summary>Finds the bridge library beside the application and patches it if the host needs that.</summary>
    public static void EnsureLoadable()
    {
        if (!OperatingSystem.IsLinux())
        {
            return;
        }
        lock (Gate)
        {
            if (_resolvedPath is not null)
            {
                return;
            }
            var library = FindBridgeLibrary();
            if (library is null)
            {
                // Nothing to patch; TorchSharp will report a missing native library in its own words.
                _resolvedPath = string.Empty;
                return;
            }
            _resolvedPath = PatchIfNeeded(library);
        }
    }

    /// <summary>The libstdc++ versions this process can satisfy, read from the libstdc++ it has loaded.</summary>
    public static IReadOnlySet<string> HostLibStdCxxVersions()
    {
        var path = LoadedLibStdCxx() ?? WellKnownLibStdCxx();
        return path is null ? new HashSet<string>() : ElfVersionNeeds.ReadDefinitions(File.ReadAllBytes(path));
    }

    private static string PatchIfNeeded(string library)
    {
        var image = File.ReadAllBytes(library);
        var available = HostLibStdCxxVersions();
        var missing = ElfVersionNeeds.ReadNeeds(image)
            .Where(n => !n.IsWeak && n.File.StartsWith("libstdc++", StringComparison.Ordinal) && !available.Contains(n.Version))
            .ToList();
        if (missing.Count == 0 || available.Count == 0)
        {
            return library;
        }
        ElfVersionNeeds.MarkWeak(image, missing);
        PatchedVersions = missing.Select(n => n.Version).ToList();
        try
        {
            ReplaceAtomically(library, image);
            return library;
        }
        catch (Exception e) when (e is UnauthorizedAccessException or IOException)
        {
            return PatchIntoCache(library, image);
        }
    }

    private static string PatchIntoCache(string library, byte[] image)
    {
        var cacheRoot = Environment.GetEnvironmentVariable("XDG_CACHE_HOME") is { Length: > 0 } xdg
            ? xdg
            : Path.Combine(Path.GetTempPath(), $"dslamesh-{Environment.UserName}");
        var hash = Convert.ToHexString(System.Security.Cryptography.SHA256.HashData(image))[..16];
        var dir = Path.Combine(cacheRoot, "dslamesh", "native", hash);
        Directory.CreateDirectory(dir);
        var copy = Path.Combine(dir, LibraryFile);
        if (!File.Exists(copy))
        {
            ReplaceAtomically(copy, image);
        }
        // The copy no longer sits beside LibTorch, so load its neighbours first: the loader matches them by soname.
        var originalDir = Path.GetDirectoryName(library)!;
        foreach (var neighbour in new[] { "libc10.so", "libtorch_cpu.so", "libtorch.so" })
        {
            var candidate = Path.Combine(originalDir, neighbour);
            if (File.Exists(candidate))
            {
                NativeLibrary.Load(candidate);
            }
        }
        var handle = NativeLibrary.Load(copy);
        NativeLibrary.SetDllImportResolver(typeof(TorchSharp.torch).Assembly, (name, _, _) =>
            name is "LibTorchSharp" or "libLibTorchSharp" or LibraryFile ? handle : IntPtr.Zero);
        return copy;
    }

    private static void ReplaceAtomically(string path, byte[] image)
    {
        var temp = $"{path}.{Environment.ProcessId}.{Guid.NewGuid():N}.tmp";
        File.WriteAllBytes(temp, image);
        if (OperatingSystem.IsWindows())
        {
            throw new PlatformNotSupportedException();
        }
        File.SetUnixFileMode(temp, UnixFileMode.UserRead | UnixFileMode.UserWrite | UnixFileMode.UserExecute |
            UnixFileMode.GroupRead | UnixFileMode.GroupExecute | UnixFileMode.OtherRead | UnixFileMode.OtherExecute);
        File.Move(temp, path, overwrite: true);
    }

    private static string? FindBridgeLibrary()
    {
        var roots = new[]
        {
            AppContext.BaseDirectory,
            Path.GetDirectoryName(typeof(TorchSharp.torch).Assembly.Location) ?? AppContext.BaseDirectory,
        };
        var rid = RuntimeInformation.ProcessArchitecture == Architecture.Arm64 ? "linux-arm64" : "linux-x64";
        return roots
            .SelectMany(r => new[] { Path.Combine(r, LibraryFile), Path.Combine(r, "runtimes", rid, "native", LibraryFile) })
            .FirstOrDefault(File.Exists);
    }

    private static string? LoadedLibStdCxx()
    {
        try
        {
            return File.ReadLines("/proc/self/maps")
                .Select(l => l.IndexOf('/', StringComparison.Ordinal) is var i and >= 0 ? l[i..] : null)
                .FirstOrDefault(p => p is not null && Path.GetFileName(p).StartsWith("libstdc++.so", StringComparison.Ordinal) && File.Exists(p));
        }
        catch (IOException)
        {
            return null;
        }
    }

    private static string? WellKnownLibStdCxx() =>
        new[] { "/usr/lib/x86_64-linux-gnu", "/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib" }
            .Select(d => Path.Combine(d, "libstdc++.so.6"))
            .FirstOrDefault(File.Exists);
}

using System.Diagnostics;
using System.Globalization;
using System.Runtime.InteropServices;
using System.Text;

namespace DslaMesh.Gateway.Bench;

/// <summary>A set of CPU numbers, written the way <c>taskset -c</c> takes it: <c>0-3,8,10-11</c>.</summary>
public sealed class CpuSet
{
    /// <summary>Bytes of the affinity mask passed to the kernel (1024 CPUs, as glibc's <c>cpu_set_t</c>).</summary>
    public const int MaskBytes = 128;

    private CpuSet(IReadOnlyList<int> cpus) => Cpus = cpus;

    /// <summary>The CPUs, ascending.</summary>
    public IReadOnlyList<int> Cpus { get; }

    public static CpuSet Parse(string text)
    {
        ArgumentNullException.ThrowIfNull(text);
        var cpus = new SortedSet<int>();
        foreach (var part in text.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries))
        {
            var dash = part.IndexOf('-', StringComparison.Ordinal);
            var first = int.Parse(dash < 0 ? part : part[..dash], NumberStyles.None, CultureInfo.InvariantCulture);
            var last = dash < 0 ? first : int.Parse(part[(dash + 1)..], NumberStyles.None, CultureInfo.InvariantCulture);
            if (first > last || last >= MaskBytes * 8)
            {
                throw new FormatException($"bad CPU range '{part}'");
            }
            for (var cpu = first; cpu <= last; cpu++)
            {
                cpus.Add(cpu);
            }
        }
        return cpus.Count > 0 ? new CpuSet([.. cpus]) : throw new FormatException($"no CPUs in '{text}'");
    }

    public static CpuSet FromMask(ReadOnlySpan<byte> mask)
    {
        var cpus = new List<int>();
        for (var cpu = 0; cpu < mask.Length * 8; cpu++)
        {
            if ((mask[cpu / 8] & (1 << (cpu % 8))) != 0)
            {
                cpus.Add(cpu);
            }
        }
        return new CpuSet(cpus);
    }

    public byte[] Mask()
    {
        var mask = new byte[MaskBytes];
        foreach (var cpu in Cpus)
        {
            mask[cpu / 8] |= (byte)(1 << (cpu % 8));
        }
        return mask;
    }

    /// <summary>Ranges, as <c>taskset -c</c> and <c>/proc/PID/status</c> write them.</summary>
    public override string ToString()
    {
        var text = new StringBuilder();
        for (var i = 0; i < Cpus.Count;)
        {
            var j = i;
            while (j + 1 < Cpus.Count && Cpus[j + 1] == Cpus[j] + 1)
            {
                j++;
            }
            text.Append(text.Length > 0 ? "," : "").Append(CultureInfo.InvariantCulture, $"{Cpus[i]}").Append(j > i ? string.Create(CultureInfo.InvariantCulture, $"-{Cpus[j]}") : "");
            i = j + 1;
        }
        return text.ToString();
    }
}

/// <summary>
/// CPU affinity on Linux. A child is pinned before its runtime starts: the calling thread's affinity is set, the child
/// is forked from that thread (it inherits the mask: all its threads, and its <see cref="Environment.ProcessorCount"/>,
/// GC heaps and Kestrel I/O queues follow), and the thread's own mask is restored. Setting
/// <see cref="Process.ProcessorAffinity"/> after the start would not do: on Linux it pins only the main thread
/// (<c>sched_setaffinity(pid)</c>), and the runtime has already sized itself for every core.
/// </summary>
public static partial class Affinity
{
    private static readonly Lock Gate = new();

    /// <summary>The CPUs this thread may run on (the process's, unless something pinned the thread).</summary>
    public static CpuSet Current()
    {
        Span<byte> mask = stackalloc byte[CpuSet.MaskBytes];
        return SchedGetAffinity(0, CpuSet.MaskBytes, mask) == 0 ? CpuSet.FromMask(mask) : throw new InvalidOperationException($"sched_getaffinity failed (errno {Marshal.GetLastPInvokeError()})");
    }

    /// <summary>What the kernel reports for a running process: its <c>Cpus_allowed_list</c>.</summary>
    public static string? Of(int pid)
    {
        try
        {
            return File.ReadLines($"/proc/{pid}/status").FirstOrDefault(l => l.StartsWith("Cpus_allowed_list:", StringComparison.Ordinal))?["Cpus_allowed_list:".Length..].Trim();
        }
        catch (IOException)
        {
            return null;
        }
    }

    /// <summary>The machine's online CPUs (<c>/sys/devices/system/cpu/online</c>), or this process's count elsewhere.</summary>
    public static int MachineCores()
    {
        try
        {
            return CpuSet.Parse(File.ReadAllText("/sys/devices/system/cpu/online").Trim()).Cpus.Count;
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException or FormatException)
        {
            return Environment.ProcessorCount;
        }
    }

    /// <summary>Starts a process that runs on <paramref name="cpus"/> (any CPU when null) from its first instruction.</summary>
    public static Process Start(ProcessStartInfo start, CpuSet? cpus)
    {
        if (cpus is null)
        {
            return Process.Start(start) ?? throw new InvalidOperationException($"{start.FileName} did not start");
        }
        if (!OperatingSystem.IsLinux())
        {
            throw new PlatformNotSupportedException("CPU sets need Linux");
        }
        // One start at a time: the mask belongs to this thread between the two calls, and Process.Start forks from it.
        lock (Gate)
        {
            Span<byte> saved = stackalloc byte[CpuSet.MaskBytes];
            if (SchedGetAffinity(0, CpuSet.MaskBytes, saved) != 0 || SchedSetAffinity(0, CpuSet.MaskBytes, cpus.Mask()) != 0)
            {
                throw new InvalidOperationException($"cannot run on CPUs {cpus} (errno {Marshal.GetLastPInvokeError()}); this machine allows {Current()}");
            }
            try
            {
                return Process.Start(start) ?? throw new InvalidOperationException($"{start.FileName} did not start");
            }
            finally
            {
                _ = SchedSetAffinity(0, CpuSet.MaskBytes, saved);
            }
        }
    }

    /// <summary>Sends a signal (SIGINT, SIGTERM) to a process.</summary>
    public static void Signal(int pid, PosixSignal signal)
    {
        var number = signal switch
        {
            PosixSignal.SIGINT => 2,
            PosixSignal.SIGQUIT => 3,
            PosixSignal.SIGTERM => 15,
            _ => 15,
        };
        _ = Kill(pid, number);
    }

    [LibraryImport("libc", EntryPoint = "sched_setaffinity", SetLastError = true)]
    private static partial int SchedSetAffinity(int pid, nint size, ReadOnlySpan<byte> mask);

    [LibraryImport("libc", EntryPoint = "sched_getaffinity", SetLastError = true)]
    private static partial int SchedGetAffinity(int pid, nint size, Span<byte> mask);

    [LibraryImport("libc", EntryPoint = "kill", SetLastError = true)]
    private static partial int Kill(int pid, int signal);
}

/// <summary>
/// A process the bench started (a replica or gateway role of this executable, or redis-server): output kept as a tail
/// for error messages, readiness polling that fails at once, with that tail, if the process exits, and a reliable end:
/// on dispose its standard input closes (a role stops when it reads end of file, so it also stops if the bench dies
/// without cleaning up), and whatever is still running a few seconds later is killed with its children. Live children
/// are also killed when this process exits or is interrupted (<see cref="KillAll"/>).
/// </summary>
public sealed class ChildProcess : IAsyncDisposable
{
    private const int HeadLines = 8;
    private const int TailLines = 40;
    private static readonly List<ChildProcess> Live = [];
    private readonly List<string> _head = [];
    private readonly Queue<string> _tail = new();
    private int _lines;
    private readonly bool _watchesStdin;

    private ChildProcess(string name, Process process, bool watchesStdin)
    {
        Name = name;
        Process = process;
        _watchesStdin = watchesStdin;
        process.OutputDataReceived += (_, e) => Keep(e.Data);
        process.ErrorDataReceived += (_, e) => Keep(e.Data);
        process.BeginOutputReadLine();
        process.BeginErrorReadLine();
        lock (Live)
        {
            Live.Add(this);
        }
    }

    public string Name { get; }

    public Process Process { get; }

    /// <summary>The CPUs the kernel lets it run on, or "?" once it is gone.</summary>
    public string Cpus => Affinity.Of(Process.Id) ?? "?";

    /// <summary>Starts this executable in a role (<c>--role NAME ...</c>), on <paramref name="cpus"/> when given.</summary>
    public static ChildProcess StartRole(string role, IEnumerable<string> arguments, CpuSet? cpus)
    {
        var start = SelfStartInfo(["--role", role, .. arguments]);
        start.RedirectStandardInput = true;
        return new ChildProcess(role, Affinity.Start(start, cpus), watchesStdin: true);
    }

    /// <summary>Starts another program (it is killed on dispose).</summary>
    public static ChildProcess StartProgram(string name, string fileName, IEnumerable<string> arguments, CpuSet? cpus)
    {
        var start = new ProcessStartInfo(fileName, arguments) { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
        try
        {
            return new ChildProcess(name, Affinity.Start(start, cpus), watchesStdin: false);
        }
        catch (System.ComponentModel.Win32Exception e)
        {
            throw new InvalidOperationException($"{fileName} did not start: {e.Message}", e);
        }
    }

    /// <summary>How to run this executable again: the app host, or <c>dotnet bench.dll</c> when started that way.</summary>
    public static ProcessStartInfo SelfStartInfo(IEnumerable<string> arguments)
    {
        var host = Environment.ProcessPath ?? throw new InvalidOperationException("no process path");
        var viaMuxer = Path.GetFileNameWithoutExtension(host).Equals("dotnet", StringComparison.OrdinalIgnoreCase);
        var start = new ProcessStartInfo(host) { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
        if (viaMuxer)
        {
            start.ArgumentList.Add(typeof(ChildProcess).Assembly.Location);
        }
        foreach (var argument in arguments)
        {
            start.ArgumentList.Add(argument);
        }
        return start;
    }

    /// <summary>Its first and last lines of output (stdout and stderr, interleaved).</summary>
    public string Tail()
    {
        lock (_tail)
        {
            if (_lines == 0)
            {
                return "(no output)";
            }
            var skipped = _lines - _head.Count - _tail.Count;
            return string.Join(Environment.NewLine, skipped > 0 ? [.. _head, $"[... {skipped} lines ...]", .. _tail] : _head.Concat(_tail));
        }
    }

    /// <summary>Polls <paramref name="ready"/> until it answers true; fails with the output's tail on exit or timeout.</summary>
    public async Task WaitUntilReadyAsync(string what, Func<CancellationToken, Task<bool>> ready, TimeSpan timeout)
    {
        var watch = Stopwatch.StartNew();
        while (true)
        {
            if (Process.HasExited)
            {
                await Process.WaitForExitAsync();   // the last output lines
                throw new InvalidOperationException($"the {Name} process (pid {Process.Id}) exited with code {Process.ExitCode} before {what}; its last output:{Environment.NewLine}{Tail()}");
            }
            using var attempt = new CancellationTokenSource(TimeSpan.FromSeconds(2));
            try
            {
                if (await ready(attempt.Token))
                {
                    return;
                }
            }
            catch (Exception e) when (e is HttpRequestException or OperationCanceledException or IOException or System.Net.Sockets.SocketException)
            {
                // Not listening yet.
            }
            if (watch.Elapsed > timeout)
            {
                throw new TimeoutException($"the {Name} process (pid {Process.Id}) did not get to {what} in {timeout.TotalSeconds:F0} s; its last output:{Environment.NewLine}{Tail()}");
            }
            await Task.Delay(50);
        }
    }

    /// <summary>Kills every child still running (from a signal handler or at process exit).</summary>
    public static void KillAll()
    {
        ChildProcess[] live;
        lock (Live)
        {
            live = [.. Live];
        }
        foreach (var child in live)
        {
            child.Kill();
        }
    }

    private void Kill()
    {
        try
        {
            Process.Kill(entireProcessTree: true);
        }
        catch (Exception e) when (e is InvalidOperationException or System.ComponentModel.Win32Exception or NotSupportedException)
        {
            // Already gone.
        }
    }

    private void Keep(string? line)
    {
        if (line is null)
        {
            return;
        }
        lock (_tail)
        {
            _lines++;
            if (_head.Count < HeadLines)
            {
                _head.Add(line);
                return;
            }
            _tail.Enqueue(line);
            while (_tail.Count > TailLines)
            {
                _tail.Dequeue();
            }
        }
    }

    /// <summary>Closes its input (a role stops by itself), waits up to 5 s, then kills what is left.</summary>
    public async ValueTask DisposeAsync()
    {
        if (_watchesStdin && !Process.HasExited)
        {
            try
            {
                Process.StandardInput.Close();
                using var grace = new CancellationTokenSource(TimeSpan.FromSeconds(5));
                await Process.WaitForExitAsync(grace.Token);
            }
            catch (Exception e) when (e is OperationCanceledException or IOException or InvalidOperationException)
            {
                // Still running: killed below.
            }
        }
        Kill();
        lock (Live)
        {
            Live.Remove(this);
        }
        Process.Dispose();
    }
}

using System.Collections.Concurrent;
using System.Diagnostics;
using DslaMesh.Tests.Common;

namespace DslaMesh.Gateway.Tests;

/// <summary>
/// A real model service in its own process (the build output of DslaMesh.ModelService), on free loopback ports, so that
/// tests can kill it the way a crash would.
/// </summary>
public sealed class ModelServiceProcess : IAsyncDisposable
{
    private readonly Process _process;
    private readonly ConcurrentQueue<string> _output = new();

    private ModelServiceProcess(Process process, string id, Uri address, Uri grpcAddress)
    {
        _process = process;
        Id = id;
        Address = address;
        GrpcAddress = grpcAddress;
        _process.OutputDataReceived += (_, e) => Keep(e.Data);
        _process.ErrorDataReceived += (_, e) => Keep(e.Data);
        _process.BeginOutputReadLine();
        _process.BeginErrorReadLine();
    }

    public string Id { get; }
    public Uri Address { get; }
    public Uri GrpcAddress { get; }
    public bool HasExited => _process.HasExited;

    /// <summary>The last lines the process printed, for failure messages.</summary>
    public string Output => string.Join('\n', _output);

    /// <summary>The model service's build output next to this test assembly's configuration.</summary>
    public static string Executable
    {
        get
        {
            var configuration = AppContext.BaseDirectory.Contains($"{Path.DirectorySeparatorChar}Release{Path.DirectorySeparatorChar}", StringComparison.Ordinal) ? "Release" : "Debug";
            return Path.Combine(RepoPaths.Root, "services", "DslaMesh.ModelService", "bin", configuration, "net10.0", "DslaMesh.ModelService.dll");
        }
    }

    /// <summary>The fixture model every gateway test serves.</summary>
    public static string ModelPath => RepoPaths.LlamaFixture("llama-gqa-untied");

    /// <summary>
    /// A copy of the fixture model with a 4096-position context (RoPE is computed for any length; the weights do not
    /// change), so streams can outlast the few hundred milliseconds the 256-position fixture needs for a full answer.
    /// </summary>
    public static string LongContextModel()
    {
        var folder = Directory.CreateTempSubdirectory("dslamesh-long-").FullName;
        foreach (var file in Directory.GetFiles(ModelPath))
        {
            File.Copy(file, Path.Combine(folder, Path.GetFileName(file)));
        }
        var config = Path.Combine(folder, "config.json");
        File.WriteAllText(config, File.ReadAllText(config).Replace("\"max_position_embeddings\": 256", "\"max_position_embeddings\": 4096", StringComparison.Ordinal));
        return folder;
    }

    /// <summary>Starts a replica registered in Redis under a prefix, and waits until /health answers 200.</summary>
    public static async Task<ModelServiceProcess> StartAsync(string id, string redis, string prefix, string? modelName = null, string? modelPath = null, CancellationToken cancellationToken = default)
    {
        var port = RedisServer.FreePort();
        var grpcPort = RedisServer.FreePort();
        var start = new ProcessStartInfo("dotnet", [Executable])
        {
            RedirectStandardOutput = true,
            RedirectStandardError = true,
            WorkingDirectory = Path.GetDirectoryName(Executable)!,
        };
        var environment = new Dictionary<string, string>
        {
            ["Kestrel__Endpoints__Http__Url"] = $"http://127.0.0.1:{port}",
            ["Kestrel__Endpoints__Http__Protocols"] = "Http1AndHttp2",
            ["Kestrel__Endpoints__Grpc__Url"] = $"http://127.0.0.1:{grpcPort}",
            ["Kestrel__Endpoints__Grpc__Protocols"] = "Http2",
            ["ModelService__ModelPath"] = modelPath ?? ModelPath,
            ["ModelService__ServiceId"] = id,
            ["ModelService__DrainTimeout"] = "00:00:05",
            ["ModelService__Backend__CpuThreads"] = "1",
            ["Redis__Configuration"] = redis,
            ["Redis__Prefix"] = prefix,
            ["Redis__PublishPeriod"] = "00:00:00.250",
            ["Logging__LogLevel__Default"] = "Warning",
            ["DOTNET_gcServer"] = "0",
            ["DOTNET_NOLOGO"] = "1",
        };
        if (modelName is not null)
        {
            environment["ModelService__ModelName"] = modelName;
        }
        foreach (var (key, value) in environment)
        {
            start.Environment[key] = value;
        }
        var process = Process.Start(start) ?? throw new InvalidOperationException("could not start the model service");
        var service = new ModelServiceProcess(process, id, new Uri($"http://127.0.0.1:{port}"), new Uri($"http://127.0.0.1:{grpcPort}"));
        using var http = new HttpClient { BaseAddress = service.Address, Timeout = TimeSpan.FromSeconds(2) };
        var deadline = Stopwatch.StartNew();
        while (true)
        {
            if (process.HasExited)
            {
                throw new InvalidOperationException($"model service {id} exited with {process.ExitCode}:\n{service.Output}");
            }
            try
            {
                if ((await http.GetAsync("/health", cancellationToken).ConfigureAwait(false)).IsSuccessStatusCode)
                {
                    return service;
                }
            }
            catch (HttpRequestException)
            {
                // Not listening yet.
            }
            catch (TaskCanceledException) when (!cancellationToken.IsCancellationRequested)
            {
                // Slow to answer while loading.
            }
            if (deadline.Elapsed > TimeSpan.FromSeconds(60))
            {
                await service.DisposeAsync().ConfigureAwait(false);
                throw new TimeoutException($"model service {id} was not healthy after 60 s:\n{service.Output}");
            }
            await Task.Delay(50, cancellationToken).ConfigureAwait(false);
        }
    }

    /// <summary>SIGKILL: no drain, no deregistration, connections reset.</summary>
    public async Task KillAsync()
    {
        if (!_process.HasExited)
        {
            _process.Kill(entireProcessTree: true);
        }
        await _process.WaitForExitAsync().WaitAsync(TimeSpan.FromSeconds(10)).ConfigureAwait(false);
    }

    /// <summary>SIGTERM: the service drains, deregisters from Redis and exits.</summary>
    public async Task StopAsync()
    {
        if (!_process.HasExited)
        {
            using var kill = Process.Start("kill", ["-TERM", _process.Id.ToString(System.Globalization.CultureInfo.InvariantCulture)]);
            await kill.WaitForExitAsync().ConfigureAwait(false);
        }
        await _process.WaitForExitAsync().WaitAsync(TimeSpan.FromSeconds(20)).ConfigureAwait(false);
    }

    private void Keep(string? line)
    {
        if (line is null)
        {
            return;
        }
        _output.Enqueue(line);
        while (_output.Count > 200 && _output.TryDequeue(out _))
        {
        }
    }

    public async ValueTask DisposeAsync()
    {
        try
        {
            await KillAsync().ConfigureAwait(false);
        }
        catch (InvalidOperationException)
        {
            // Never started or already reaped.
        }
        _process.Dispose();
    }
}

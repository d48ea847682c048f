using System.CommandLine;
using System.Globalization;
using System.Text.Json;
using DslaMesh.Engine.Backends;
using DslaMesh.Engine.Diagnostics;
using DslaMesh.Engine.Kernels;

namespace DslaMesh.Cli.Commands;

/// <summary><c>dslactl kernels …</c>: the engine's runtime-compiled CUDA kernels.</summary>
public static class KernelCommands
{
    /// <summary>Builds <c>kernels</c> and its subcommands.</summary>
    public static Command Create()
    {
        var kernels = new Command("kernels", "The engine's CUDA kernels (compiled at run time with NVRTC).");
        kernels.Subcommands.Add(CreateCheck());
        return kernels;
    }

    private static Command CreateCheck()
    {
        var device = new Option<string>("--device") { Description = "cuda or cuda:N.", DefaultValueFactory = _ => "cuda" };
        var libTorch = new Option<DirectoryInfo?>("--libtorch") { Description = "CUDA LibTorch folder (default: ask python3 where torch lives)." };
        var json = new Option<FileInfo?>("--json") { Description = "Write every case's result as JSON to this file." };
        var command = new Command("check", "Compare every kernel with its plain-tensor reference across shapes, batch sizes, odd lengths, GQA and dtypes (needs a CUDA GPU). Exit code 1 when any case fails.");
        command.Options.Add(device);
        command.Options.Add(libTorch);
        command.Options.Add(json);
        command.SetAction((result, cancellationToken) => EngineOptions.GuardAsync(async () =>
        {
            var torchDevice = TorchRuntime.Initialize(new TorchBackendOptions { Device = result.GetValue(device)!, LibTorchDirectory = result.GetValue(libTorch)?.FullName });
            IReadOnlyList<KernelCheck> checks;
            try
            {
                void Print(KernelCheck check) => Console.WriteLine(string.Create(CultureInfo.InvariantCulture,
                    $"{(check.Passed ? "ok  " : "FAIL")} {check.Kernel,-16} {check.DType,-9} {check.Case,-52} max|Δ| {check.MaxAbsError:E2} (≤ {check.Tolerance:E1}){(check.CacheWritten ? "" : ", cache not written as expected")}"));
                checks = [.. KernelChecks.DecodeAttentionCases(torchDevice, Print), .. KernelChecks.DecodeGemvCases(torchDevice, Print), .. KernelChecks.RmsNormCases(torchDevice, Print)];
            }
            catch (InvalidOperationException error)
            {
                await Console.Error.WriteLineAsync($"error: {error.Message}").ConfigureAwait(false);
                return ExitCodes.DataError;
            }
            var failed = checks.Count(c => !c.Passed);
            Console.WriteLine(string.Create(CultureInfo.InvariantCulture, $"{checks.Count - failed}/{checks.Count} cases passed (NVRTC: {CudaKernels.NvrtcPath}; cache: {CudaKernels.CacheDirectory})"));
            if (result.GetValue(json) is { } path)
            {
                path.Directory?.Create();
                await File.WriteAllTextAsync(path.FullName, JsonSerializer.Serialize(checks, BenchmarkJsonContext.Default.IReadOnlyListKernelCheck) + "\n", cancellationToken).ConfigureAwait(false);
            }
            return failed == 0 ? ExitCodes.Ok : ExitCodes.Different;
        }));
        return command;
    }
}

using DslaMesh.Engine.Backends;

namespace DslaMesh.Tests.Common;

/// <summary>
/// Assembly fixture that starts TorchSharp on the CPU before any test runs. TorchSharp loads its native bridge in the
/// static constructor of <c>torch</c>, and a failed load is permanent for the process; the bridge only loads on
/// Debian 12 after <see cref="LibTorchSharpLoader"/> patched it. Without this fixture, whichever test first touches a
/// <c>torch</c> member without calling <see cref="TorchRuntime.EnsureCpu"/> (xUnit v3 shuffles the order) breaks every
/// TorchSharp test in the assembly on a fresh build.
/// </summary>
public sealed class TorchCpuRuntime
{
    /// <summary>Starts the CPU runtime (idempotent).</summary>
    public TorchCpuRuntime() => TorchRuntime.EnsureCpu();
}

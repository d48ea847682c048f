using DslaMesh.Engine.Models;
using TorchSharp;
using static TorchSharp.torch;

namespace DslaMesh.Engine.Dsla;

/// <summary>
/// Seeded initialisers shared by the DSLA layers (call under no_grad). Random values are drawn in fp32 on the CPU from a
/// CPU generator and then copied to the layer's device and dtype: TorchSharp's <see cref="Generator"/> is a CPU generator
/// whatever device it is given, which CUDA kernels reject, and drawing on the CPU gives a CUDA run the same initial bits
/// as a CPU run.
/// </summary>
internal static class Init
{
    /// <summary>Copies a teacher projection's weight (and bias) into a student one of the same shape.</summary>
    public static void CopyProjection(Projection student, Projection teacher)
    {
        student.Weight.copy_(teacher.Weight);
        if (student.Bias is { } bias)
        {
            if (teacher.Bias is { } teacherBias)
            {
                bias.copy_(teacherBias);
            }
            else
            {
                bias.zero_();
            }
        }
    }

    /// <summary>Weight = the rectangular identity (torch.nn.init.eye_), bias = 0.</summary>
    public static void Identity(Projection projection)
    {
        using var eye = torch.eye(projection.OutFeatures, projection.InFeatures, dtype: projection.Weight.dtype, device: projection.Weight.device);
        projection.Weight.copy_(eye);
        projection.Bias?.zero_();
    }

    /// <summary>nn.Linear's default weight init, U(−1/√in, 1/√in) (kaiming_uniform with a = √5); bias = 0 as in the paper's code.</summary>
    public static void LinearDefault(Projection projection, Generator generator)
    {
        var bound = 1.0 / Math.Sqrt(projection.InFeatures);
        Uniform(projection.Weight, -bound, bound, generator);
        projection.Bias?.zero_();
    }

    /// <summary>A CPU generator for the seeded initialisers.</summary>
    public static Generator CpuGenerator(long seed) => new((ulong)seed, torch.CPU);

    /// <summary>Fills <paramref name="target"/> (any device and dtype) with U(low, high) drawn in fp32 on the CPU.</summary>
    public static void Uniform(Tensor target, double low, double high, Generator generator)
    {
        using var scope = torch.NewDisposeScope();
        var values = torch.empty(target.shape, ScalarType.Float32, torch.CPU).uniform_(low, high, generator);
        target.copy_(values.to(target.dtype, target.device));
    }
}

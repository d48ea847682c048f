using DslaMesh.Engine.Models;
using TorchSharp;
using static TorchSharp.torch;

namespace DslaMesh.Engine.Dsla;

/// <summary>Seeded initialisers shared by the DSLA layers (call under no_grad).</summary>
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
        projection.Weight.uniform_(-bound, bound, generator);
        projection.Bias?.zero_();
    }
}

namespace DslaMesh.Engine.Dsla;

/// <summary>The kinds of attention replacement a layer set can hold.</summary>
public enum DslaVariant
{
    /// <summary>The paper's dual-state layer: gates from the layer input x (<see cref="DslaAttention"/>).</summary>
    Dsla,

    /// <summary>Dual-state layer whose states fold exactly from the replaced layer's KV cache (<see cref="FoldableDslaAttention"/>).</summary>
    DslaFoldable,

    /// <summary>Single-state GLA baseline for the ablation (<see cref="GlaAttention"/>).</summary>
    Gla,
}

/// <summary>The variants' wire names: <c>dsla</c>, <c>dsla-foldable</c>, <c>gla</c>.</summary>
public static class DslaVariants
{
    /// <summary>The wire name of a variant.</summary>
    public static string Name(DslaVariant variant) => variant switch
    {
        DslaVariant.Dsla => "dsla",
        DslaVariant.DslaFoldable => "dsla-foldable",
        DslaVariant.Gla => "gla",
        _ => throw new ArgumentOutOfRangeException(nameof(variant), variant, null),
    };

    /// <summary>Parses a wire name (case-insensitive).</summary>
    /// <exception cref="ArgumentException">Unknown name.</exception>
    public static DslaVariant Parse(string name) => name?.Trim().ToLowerInvariant() switch
    {
        "dsla" => DslaVariant.Dsla,
        "dsla-foldable" => DslaVariant.DslaFoldable,
        "gla" => DslaVariant.Gla,
        _ => throw new ArgumentException($"Unknown DSLA variant '{name}' (known: dsla, dsla-foldable, gla).", nameof(name)),
    };
}

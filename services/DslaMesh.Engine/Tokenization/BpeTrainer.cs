using System.Text;
using System.Text.Json;
using System.Text.RegularExpressions;

namespace DslaMesh.Engine.Tokenization;

/// <summary>
/// Trains a GPT-2 style byte-level BPE tokenizer and writes it as a Hugging Face <c>tokenizer.json</c> (model BPE,
/// ByteLevel pre-tokenizer and decoder) that the Rust <c>tokenizers</c> library, and so <see cref="TextTokenizer"/>,
/// loads. Every one of the 256 bytes is a base token, so any text encodes without <c>&lt;unk&gt;</c>.
/// </summary>
/// <remarks>
/// Deterministic: the result depends only on the texts' pre-token counts. Each round merges the most frequent adjacent
/// pair; ties go to the pair with the smaller (left id, right id), where ids are assigned in a fixed order (special
/// tokens, then the 256 bytes in byte order, then merges in the order they were made). Pair counts are updated
/// incrementally, touching only the words that contain the merged pair.
/// </remarks>
public sealed partial class BpeTrainer
{
    /// <summary><c>&lt;s&gt;</c> = 0, <c>&lt;/s&gt;</c> = 1, <c>&lt;unk&gt;</c> = 2.</summary>
    public static readonly IReadOnlyList<string> DefaultSpecialTokens = ["<s>", "</s>", "<unk>"];

    public BpeTrainer(int vocabSize, IReadOnlyList<string>? specialTokens = null, int minFrequency = 2)
    {
        SpecialTokens = specialTokens ?? DefaultSpecialTokens;
        if (vocabSize < SpecialTokens.Count + 256)
        {
            throw new ArgumentOutOfRangeException(nameof(vocabSize), vocabSize, $"A byte-level vocabulary needs at least {SpecialTokens.Count + 256} tokens (the specials and 256 bytes).");
        }
        ArgumentOutOfRangeException.ThrowIfLessThan(minFrequency, 1);
        VocabSize = vocabSize;
        MinFrequency = minFrequency;
    }

    /// <summary>Largest vocabulary to build (specials + 256 bytes + merges).</summary>
    public int VocabSize { get; }

    /// <summary>Special tokens, given ids 0, 1, …</summary>
    public IReadOnlyList<string> SpecialTokens { get; }

    /// <summary>Pairs seen fewer times than this are never merged (training stops early).</summary>
    public int MinFrequency { get; }

    /// <summary>GPT-2's pre-tokenisation pattern, the one HF's ByteLevel pre-tokenizer applies with use_regex.</summary>
    [GeneratedRegex(@"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+", RegexOptions.CultureInvariant)]
    public static partial Regex PreTokenizer();

    /// <summary>Learns merges from <paramref name="texts"/>.</summary>
    public BpeVocabulary Train(IEnumerable<string> texts)
    {
        ArgumentNullException.ThrowIfNull(texts);
        var counts = CountPreTokens(texts);

        var tokens = new List<string>(VocabSize);
        tokens.AddRange(SpecialTokens);
        var firstByteId = tokens.Count;
        for (var b = 0; b < 256; b++)
        {
            tokens.Add(ByteLevelAlphabet.ByteToChar[b].ToString());
        }
        var idOf = new Dictionary<string, int>(StringComparer.Ordinal);
        for (var i = 0; i < tokens.Count; i++)
        {
            idOf.TryAdd(tokens[i], i);
        }

        // Words in ordinal order (for a deterministic layout; the result would not change otherwise).
        var words = counts.OrderBy(kv => kv.Key, StringComparer.Ordinal).ToArray();
        var symbols = new List<int>[words.Length];
        var frequency = new long[words.Length];
        for (var w = 0; w < words.Length; w++)
        {
            var bytes = Encoding.UTF8.GetBytes(words[w].Key);
            symbols[w] = new List<int>(bytes.Length);
            foreach (var b in bytes)
            {
                symbols[w].Add(firstByteId + b);
            }
            frequency[w] = words[w].Value;
        }

        var pairCounts = new Dictionary<long, long>();
        var pairWords = new Dictionary<long, HashSet<int>>();
        for (var w = 0; w < words.Length; w++)
        {
            AddPairs(w);
        }
        var queue = new PriorityQueue<long, (long Count, long Pair)>(pairCounts.Count, QueueOrder.Instance);
        foreach (var (pair, count) in pairCounts)
        {
            queue.Enqueue(pair, (count, pair));
        }

        var merges = new List<(string Left, string Right)>();
        while (tokens.Count < VocabSize && queue.TryDequeue(out var best, out var priority))
        {
            var current = pairCounts.GetValueOrDefault(best);
            if (current != priority.Count)
            {
                // Stale entry: counts only fall for existing pairs, so re-file it under its current count.
                if (current > 0)
                {
                    queue.Enqueue(best, (current, best));
                }
                continue;
            }
            if (current < MinFrequency)
            {
                break;
            }
            var (left, right) = Unpack(best);
            var merged = tokens[left] + tokens[right];
            if (!idOf.TryGetValue(merged, out var newId))
            {
                newId = tokens.Count;
                tokens.Add(merged);
                idOf[merged] = newId;
            }
            merges.Add((tokens[left], tokens[right]));

            var created = new HashSet<long>();
            foreach (var w in pairWords[best].Order().ToArray())
            {
                var word = symbols[w];
                if (!Contains(word, left, right))
                {
                    continue;
                }
                RemovePairs(w);
                for (var i = 0; i < word.Count - 1; i++)
                {
                    if (word[i] == left && word[i + 1] == right)
                    {
                        word[i] = newId;
                        word.RemoveAt(i + 1);
                    }
                }
                AddPairs(w);
                for (var i = 0; i < word.Count - 1; i++)
                {
                    if (word[i] == newId || word[i + 1] == newId)
                    {
                        created.Add(Pack(word[i], word[i + 1]));
                    }
                }
            }
            pairCounts.Remove(best);
            pairWords.Remove(best);
            foreach (var pair in created.Order())
            {
                if (pairCounts.GetValueOrDefault(pair) is var count and > 0)
                {
                    queue.Enqueue(pair, (count, pair));
                }
            }
        }
        return new BpeVocabulary(tokens, merges, SpecialTokens);

        void AddPairs(int w)
        {
            var word = symbols[w];
            for (var i = 0; i < word.Count - 1; i++)
            {
                var pair = Pack(word[i], word[i + 1]);
                pairCounts[pair] = pairCounts.GetValueOrDefault(pair) + frequency[w];
                if (!pairWords.TryGetValue(pair, out var set))
                {
                    set = [];
                    pairWords[pair] = set;
                }
                set.Add(w);
            }
        }

        void RemovePairs(int w)
        {
            var word = symbols[w];
            for (var i = 0; i < word.Count - 1; i++)
            {
                var pair = Pack(word[i], word[i + 1]);
                pairCounts[pair] -= frequency[w];
            }
        }
    }

    /// <summary>Pre-token counts of the texts, as GPT-2's regex splits them.</summary>
    public static Dictionary<string, long> CountPreTokens(IEnumerable<string> texts)
    {
        var counts = new Dictionary<string, long>(StringComparer.Ordinal);
        var regex = PreTokenizer();
        var lookup = counts.GetAlternateLookup<ReadOnlySpan<char>>();
        foreach (var text in texts)
        {
            foreach (var match in regex.EnumerateMatches(text))
            {
                var piece = text.AsSpan(match.Index, match.Length);
                if (lookup.TryGetValue(piece, out var existing))
                {
                    lookup[piece] = existing + 1;
                }
                else
                {
                    counts[piece.ToString()] = 1;
                }
            }
        }
        return counts;
    }

    private static bool Contains(List<int> word, int left, int right)
    {
        for (var i = 0; i < word.Count - 1; i++)
        {
            if (word[i] == left && word[i + 1] == right)
            {
                return true;
            }
        }
        return false;
    }

    private static long Pack(int left, int right) => ((long)left << 32) | (uint)right;

    private static (int Left, int Right) Unpack(long pair) => ((int)(pair >> 32), (int)(pair & 0xFFFFFFFF));

    /// <summary>Highest count first; among equal counts the smaller (left, right) pair.</summary>
    private sealed class QueueOrder : IComparer<(long Count, long Pair)>
    {
        public static readonly QueueOrder Instance = new();

        public int Compare((long Count, long Pair) x, (long Count, long Pair) y)
        {
            var byCount = y.Count.CompareTo(x.Count);
            return byCount != 0 ? byCount : x.Pair.CompareTo(y.Pair);
        }
    }
}

/// <summary>A trained byte-level BPE vocabulary: tokens in id order and merges in rank order.</summary>
public sealed class BpeVocabulary
{
    public BpeVocabulary(IReadOnlyList<string> tokens, IReadOnlyList<(string Left, string Right)> merges, IReadOnlyList<string> specialTokens)
    {
        Tokens = tokens;
        Merges = merges;
        SpecialTokens = specialTokens;
    }

    /// <summary>Token strings (byte-level alphabet) by id.</summary>
    public IReadOnlyList<string> Tokens { get; }

    /// <summary>Merges, highest priority first.</summary>
    public IReadOnlyList<(string Left, string Right)> Merges { get; }

    /// <summary>Special tokens (ids 0 …).</summary>
    public IReadOnlyList<string> SpecialTokens { get; }

    /// <summary>Vocabulary size.</summary>
    public int Count => Tokens.Count;

    /// <summary>The HF <c>tokenizer.json</c> text (UTF-8, indented, stable byte for byte).</summary>
    public byte[] ToTokenizerJson()
    {
        using var stream = new MemoryStream();
        using (var json = new Utf8JsonWriter(stream, new JsonWriterOptions { Indented = true, Encoder = System.Text.Encodings.Web.JavaScriptEncoder.UnsafeRelaxedJsonEscaping }))
        {
            json.WriteStartObject();
            json.WriteString("version", "1.0");
            json.WriteNull("truncation");
            json.WriteNull("padding");
            json.WriteStartArray("added_tokens");
            for (var i = 0; i < SpecialTokens.Count; i++)
            {
                json.WriteStartObject();
                json.WriteNumber("id", i);
                json.WriteString("content", SpecialTokens[i]);
                json.WriteBoolean("single_word", false);
                json.WriteBoolean("lstrip", false);
                json.WriteBoolean("rstrip", false);
                json.WriteBoolean("normalized", false);
                json.WriteBoolean("special", true);
                json.WriteEndObject();
            }
            json.WriteEndArray();
            json.WriteNull("normalizer");
            json.WriteStartObject("pre_tokenizer");
            WriteByteLevel(json);
            json.WriteEndObject();
            json.WriteNull("post_processor");
            json.WriteStartObject("decoder");
            WriteByteLevel(json);
            json.WriteEndObject();
            json.WriteStartObject("model");
            json.WriteString("type", "BPE");
            json.WriteNull("dropout");
            json.WriteString("unk_token", SpecialTokens.Contains("<unk>") ? "<unk>" : null);
            json.WriteNull("continuing_subword_prefix");
            json.WriteNull("end_of_word_suffix");
            json.WriteBoolean("fuse_unk", false);
            json.WriteBoolean("byte_fallback", false);
            json.WriteBoolean("ignore_merges", false);
            json.WriteStartObject("vocab");
            var seen = new HashSet<string>(StringComparer.Ordinal);
            for (var id = 0; id < Tokens.Count; id++)
            {
                if (seen.Add(Tokens[id]))
                {
                    json.WriteNumber(Tokens[id], id);
                }
            }
            json.WriteEndObject();
            json.WriteStartArray("merges");
            foreach (var (left, right) in Merges)
            {
                json.WriteStartArray();
                json.WriteStringValue(left);
                json.WriteStringValue(right);
                json.WriteEndArray();
            }
            json.WriteEndArray();
            json.WriteEndObject();
            json.WriteEndObject();
        }
        stream.WriteByte((byte)'\n');
        return stream.ToArray();

        static void WriteByteLevel(Utf8JsonWriter json)
        {
            json.WriteString("type", "ByteLevel");
            json.WriteBoolean("add_prefix_space", false);
            json.WriteBoolean("trim_offsets", true);
            json.WriteBoolean("use_regex", true);
        }
    }

    /// <summary>Writes <c>tokenizer.json</c> (atomically: a temporary file, then a rename).</summary>
    public void WriteTokenizerJson(string path)
    {
        var temp = path + ".tmp";
        File.WriteAllBytes(temp, ToTokenizerJson());
        File.Move(temp, path, overwrite: true);
    }
}

/// <summary>
/// GPT-2's reversible map from bytes to printable characters: printable Latin-1 bytes map to themselves, the other 68
/// to U+0100 onwards (space becomes <c>Ġ</c>, newline <c>Ċ</c>).
/// </summary>
public static class ByteLevelAlphabet
{
    /// <summary>The character for each byte.</summary>
    public static readonly IReadOnlyList<char> ByteToChar = Build();

    /// <summary>Byte-level spelling of a text's UTF-8 bytes.</summary>
    public static string Encode(string text)
    {
        var bytes = Encoding.UTF8.GetBytes(text);
        var chars = new char[bytes.Length];
        for (var i = 0; i < bytes.Length; i++)
        {
            chars[i] = ByteToChar[bytes[i]];
        }
        return new string(chars);
    }

    private static char[] Build()
    {
        var map = new char[256];
        var printable = new bool[256];
        for (var b = '!'; b <= '~'; b++)
        {
            printable[b] = true;
        }
        for (var b = 0xA1; b <= 0xAC; b++)
        {
            printable[b] = true;
        }
        for (var b = 0xAE; b <= 0xFF; b++)
        {
            printable[b] = true;
        }
        var next = 0;
        for (var b = 0; b < 256; b++)
        {
            map[b] = printable[b] ? (char)b : (char)(256 + next++);
        }
        return map;
    }
}

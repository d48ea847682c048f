using System.Text.Json;
using DslaMesh.Engine.Tokenization;

namespace DslaMesh.Engine.Tests.Tokenization;

public sealed class BpeTrainerTests : IDisposable
{
    private const string Corpus = """
        The jury said it did find that many of Georgia's registration and election laws "are outmoded or inadequate
        and often ambiguous". It recommended that Fulton legislators act "to have these laws studied and revised to the
        end of modernizing and improving them". The grand jury commented on a number of other topics, among them the
        Atlanta and Fulton County purchasing departments which it said "are well operated and follow generally accepted
        practices which inure to the best interest of both governments".
        Merger proposed: however, the jury said it believes "these two offices should be combined to achieve greater
        efficiency and reduce the cost of administration". The City Purchasing Department, the jury said, "is lacking in
        experienced clerical personnel as a result of city personnel policies". It urged that the city "take steps to
        remedy" this problem. 1,000 voters; 42% turnout -- 3.5 times more than in 1958!
        """;

    private readonly string _directory = Directory.CreateTempSubdirectory("dsla-bpe-").FullName;

    public void Dispose() => Directory.Delete(_directory, recursive: true);

    private static BpeVocabulary Train(int vocab = 340) => new BpeTrainer(vocab).Train(Corpus.Split('\n'));

    [Fact]
    public void Special_tokens_then_bytes_then_merges()
    {
        var vocabulary = Train();
        Assert.Equal(["<s>", "</s>", "<unk>"], vocabulary.Tokens.Take(3));
        Assert.Equal("Ġ", vocabulary.Tokens[3 + ' ']);
        Assert.Equal("Ċ", vocabulary.Tokens[3 + '\n']);
        Assert.Equal("a", vocabulary.Tokens[3 + 'a']);
        Assert.Equal(340, vocabulary.Count);
        Assert.Equal(340 - 259, vocabulary.Merges.Count);
        // The most frequent pair in English text: a space before "t" or the "th"/"he" family.
        Assert.Contains(vocabulary.Merges[0], new[] { ("Ġ", "t"), ("h", "e"), ("t", "h"), ("Ġ", "a") });
        Assert.Contains("Ġthe", vocabulary.Tokens);
    }

    [Fact]
    public void Training_is_deterministic()
    {
        Assert.Equal(Train().ToTokenizerJson(), Train().ToTokenizerJson());
    }

    [Fact]
    public void Stops_at_min_frequency_when_pairs_run_out()
    {
        var vocabulary = new BpeTrainer(10_000).Train(["abab abab"]);
        Assert.True(vocabulary.Count < 270, $"{vocabulary.Count} tokens from one short text");
        // ab ×4, then abab ×2; " abab" occurs once, below the minimum frequency of 2.
        Assert.Contains("abab", vocabulary.Tokens);
        Assert.DoesNotContain("Ġabab", vocabulary.Tokens);
    }

    [Fact]
    public void Hugging_Face_tokenizers_loads_it_and_round_trips_any_text()
    {
        var path = Path.Combine(_directory, "tokenizer.json");
        var vocabulary = Train();
        vocabulary.WriteTokenizerJson(path);
        using (var document = JsonDocument.Parse(File.ReadAllBytes(path)))
        {
            var model = document.RootElement.GetProperty("model");
            Assert.Equal("BPE", model.GetProperty("type").GetString());
            Assert.Equal("ByteLevel", document.RootElement.GetProperty("pre_tokenizer").GetProperty("type").GetString());
            Assert.False(document.RootElement.GetProperty("pre_tokenizer").GetProperty("add_prefix_space").GetBoolean());
            Assert.Equal("ByteLevel", document.RootElement.GetProperty("decoder").GetProperty("type").GetString());
            Assert.Equal(vocabulary.Merges.Count, model.GetProperty("merges").GetArrayLength());
        }

        using var tokenizer = TextTokenizer.Load(path);
        string[] samples =
        [
            "The jury said it did find that many of Georgia's registration laws are outmoded.",
            "  leading spaces, trailing spaces  \n\nand\ttabs\r\n",
            "naïve café, Zürich — “smart quotes” … 東京 🙂 \u0000 control \u007f",
            "Numbers 1,000 and 3.5% -- 'single' \"double\" (parens) [brackets] {braces}",
            "x",
        ];
        foreach (var sample in samples)
        {
            var ids = tokenizer.Encode(sample);
            Assert.DoesNotContain(2, ids);                    // byte-level: never <unk>
            Assert.All(ids, id => Assert.InRange(id, 0, vocabulary.Count - 1));
            Assert.Equal(sample, tokenizer.Decode(ids));
        }
        // Merges make English shorter than its bytes.
        var english = "The grand jury commented on a number of other topics.";
        var count = tokenizer.Encode(english).Length;
        Assert.True(count < english.Length * 2 / 3, $"{count} tokens for {english.Length} characters");
    }

    [Fact]
    public void Encoding_matches_the_trainers_merges()
    {
        var path = Path.Combine(_directory, "tokenizer.json");
        var vocabulary = Train();
        vocabulary.WriteTokenizerJson(path);
        using var tokenizer = TextTokenizer.Load(path);
        var ids = tokenizer.Encode("The jury said");
        Assert.Equal(["The", "Ġjury", "Ġsaid"], ids.Select(id => vocabulary.Tokens[id]));
    }

    [Fact]
    public void Byte_alphabet_is_a_bijection_onto_printable_characters()
    {
        var chars = ByteLevelAlphabet.ByteToChar;
        Assert.Equal(256, chars.Distinct().Count());
        Assert.All(chars, c => Assert.False(char.IsWhiteSpace(c) || char.IsControl(c), $"U+{(int)c:X4}"));
        Assert.Equal("HelloĠworldĊ", ByteLevelAlphabet.Encode("Hello world\n"));
    }
}

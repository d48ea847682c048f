using DslaMesh.Engine.Data;

namespace DslaMesh.Engine.Tests.Data;

/// <summary>Needs the corpus: deploy/data/fetch-brown.sh (CI runs it). Without it these tests fail and say so.</summary>
public sealed class BrownCorpusTests
{
    private static readonly Lazy<BrownCorpus> Corpus = new(() => BrownCorpus.Load());

    [Fact]
    public void Loads_500_documents_with_a_fixed_split_of_every_20th()
    {
        var corpus = Corpus.Value;
        Assert.Equal(500, corpus.Documents.Count);
        Assert.Equal(475, corpus.Train.Count);
        Assert.Equal(25, corpus.HeldOut.Count);
        Assert.Equal("ca01", corpus.Documents[0].Id);
        Assert.Equal("cr09", corpus.Documents[^1].Id);
        Assert.Equal(["ca20", "ca40", "cb16"], corpus.HeldOut.Take(3).Select(d => d.Id));
        Assert.Equal("cr09", corpus.HeldOut[^1].Id);
        for (var i = 0; i < corpus.Documents.Count; i++)
        {
            Assert.Equal((i + 1) % 20 == 0, corpus.Documents[i].IsHeldOut);
        }
        Assert.Equal(15, corpus.Documents.Select(d => d.Category).Distinct().Count());
        Assert.Equal("news", corpus.Documents[0].Category);
        // Held-out documents come from most genres, not just one.
        Assert.True(corpus.HeldOut.Select(d => d.Category).Distinct().Count() >= 10);
    }

    [Fact]
    public void Text_is_readable_with_tags_stripped()
    {
        var corpus = Corpus.Value;
        var first = corpus.Documents[0].Text;
        Assert.StartsWith(
            "The Fulton County Grand Jury said Friday an investigation of Atlanta's recent primary election produced \"no evidence\" that any irregularities took place.\n",
            first, StringComparison.Ordinal);
        Assert.Contains("\"Only a relative handful of such reports was received,\" the jury said, \"considering the widespread interest in the election,", first, StringComparison.Ordinal);
        var all = string.Join("\n", corpus.Documents.Select(d => d.Text));
        Assert.DoesNotContain("/nn", all, StringComparison.Ordinal);
        Assert.DoesNotContain("/at ", all, StringComparison.Ordinal);
        Assert.DoesNotContain("``", all, StringComparison.Ordinal);
        Assert.DoesNotContain("''", all, StringComparison.Ordinal);
        Assert.DoesNotContain(" ,", all, StringComparison.Ordinal);
        Assert.DoesNotContain(" .", all, StringComparison.Ordinal);
        Assert.Contains("1-1/2", all, StringComparison.Ordinal);      // slashes inside words survive
        Assert.InRange(all.Length, 5_000_000, 7_000_000);
    }

    [Fact]
    public void Train_and_held_out_text_are_disjoint_and_cover_the_corpus()
    {
        var corpus = Corpus.Value;
        Assert.Equal(corpus.Train.Sum(d => d.Text.Length) + (2 * 474), corpus.TrainText.Length);
        Assert.Equal(corpus.HeldOut.Sum(d => d.Text.Length) + (2 * 24), corpus.HeldOutText.Length);
        Assert.DoesNotContain(corpus.HeldOut[0].Text, corpus.TrainText, StringComparison.Ordinal);
    }

    [Theory]
    [InlineData(new[] { "``", "Hello", "''", ",", "he", "said", "." }, "\"Hello,\" he said.")]
    [InlineData(new[] { "``", "Nate", "''", "!", "!", "He", "shouted", ";", ";", "why", "?", "?" }, "\"Nate!\" He shouted; why?")]
    [InlineData(new[] { "a", "``", "b", "''", ";", "c", "''", "." }, "a \"b\"; c.\"")]
    [InlineData(new[] { "He", "said", "'", "no", "'", "twice", "." }, "He said 'no' twice.")]
    [InlineData(new[] { "(", "see", "above", ")", ";", "then", "--", "stop", "!" }, "(see above); then--stop!")]
    [InlineData(new[] { "Ivan", "Allen", "Jr.", "." }, "Ivan Allen Jr.")]
    [InlineData(new[] { "Is", "it", "?", "Yes", ":", "1-1/2", "%" }, "Is it? Yes: 1-1/2 %")]
    public void Detokenizes_quotes_and_punctuation(string[] words, string expected)
    {
        Assert.Equal(expected, BrownText.Detokenize(words));
    }

    [Fact]
    public void Parses_tagged_paragraphs_and_headlines()
    {
        const string tagged = "\n\n\tThe/at jury/nn said/vbd ./.\nIt/pps agreed/vbd ./.\n\n\n\tChapter/nn-hl one/cd-hl \nScotty/np left/vbd ./.\n";
        Assert.Equal("The jury said. It agreed.\nChapter one\nScotty left.", BrownText.ParseDocument(tagged));
        Assert.Equal("1-1/2", BrownText.StripTag("1-1/2/cd"));
    }

    [Fact]
    public void Missing_corpus_error_says_how_to_fetch_it()
    {
        var empty = Directory.CreateTempSubdirectory("dsla-nobrown-").FullName;
        try
        {
            var error = Assert.Throws<CorpusNotFoundException>(() => BrownCorpus.Load(empty));
            Assert.Contains("deploy/data/fetch-brown.sh", error.Message, StringComparison.Ordinal);
        }
        finally
        {
            Directory.Delete(empty);
        }
    }
}

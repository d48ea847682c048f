using DslaMesh.Engine.Models;
using Tokenizers.DotNet;

namespace DslaMesh.Engine.Tokenization;

/// <summary>
/// A Hugging Face <c>tokenizer.json</c> tokenizer, run by the Rust <c>tokenizers</c> library (through
/// Tokenizers.DotNet), plus incremental detokenisation for streaming.
/// </summary>
public sealed class TextTokenizer : IDisposable
{
    private readonly Tokenizer _tokenizer;
    private readonly Lock _gate = new();

    private TextTokenizer(Tokenizer tokenizer, string path)
    {
        _tokenizer = tokenizer;
        Path = path;
    }

    /// <summary>The tokenizer.json file.</summary>
    public string Path { get; }

    /// <summary>Loads <c>tokenizer.json</c> from a model folder or a file path.</summary>
    /// <exception cref="ModelLoadException">The file is missing or not a tokenizer the library understands.</exception>
    public static TextTokenizer Load(string folderOrFile)
    {
        var path = Directory.Exists(folderOrFile) ? System.IO.Path.Combine(folderOrFile, "tokenizer.json") : folderOrFile;
        if (!File.Exists(path))
        {
            throw new ModelLoadException($"Tokenizer not found: '{path}'.");
        }
        try
        {
            return new TextTokenizer(new Tokenizer(vocabPath: path), path);
        }
        catch (TokenizerException e)
        {
            throw new ModelLoadException($"'{path}' is not a valid tokenizer.json: {e.Message}", e);
        }
    }

    /// <summary>Token ids for a text (special tokens as the tokenizer's post-processor adds them).</summary>
    public int[] Encode(string text)
    {
        lock (_gate)
        {
            return Array.ConvertAll(_tokenizer.Encode(text), id => checked((int)id));
        }
    }

    /// <summary>Text for token ids.</summary>
    public string Decode(IReadOnlyList<int> ids)
    {
        if (ids.Count == 0)
        {
            return string.Empty;
        }
        var raw = new uint[ids.Count];
        for (var i = 0; i < raw.Length; i++)
        {
            raw[i] = checked((uint)ids[i]);
        }
        lock (_gate)
        {
            return _tokenizer.Decode(raw);
        }
    }

    /// <summary>Starts incremental decoding for one stream.</summary>
    public IncrementalDecoder CreateDecoder() => new(this);

    /// <inheritdoc/>
    public void Dispose() => _tokenizer.Dispose();
}

/// <summary>
/// Turns a growing list of token ids into text deltas. A token can end inside a multi-byte character (byte-level BPE),
/// so text is only released once it no longer ends in U+FFFD, and always as a suffix of the full decode.
/// </summary>
public sealed class IncrementalDecoder
{
    private readonly TextTokenizer _tokenizer;
    private readonly List<int> _ids = [];
    private int _emitted;

    internal IncrementalDecoder(TextTokenizer tokenizer) => _tokenizer = tokenizer;

    /// <summary>Everything decoded so far.</summary>
    public string Text { get; private set; } = string.Empty;

    /// <summary>Adds a token and returns the new text it completes (possibly empty).</summary>
    public string Push(int id)
    {
        _ids.Add(id);
        var text = _tokenizer.Decode(_ids);
        if (text.EndsWith('\uFFFD'))
        {
            return string.Empty;
        }
        Text = text;
        var delta = _emitted <= text.Length ? text[_emitted..] : string.Empty;
        _emitted = text.Length;
        return delta;
    }

    /// <summary>Whatever is held back at the end of the stream.</summary>
    public string Flush()
    {
        var text = _tokenizer.Decode(_ids);
        var delta = _emitted <= text.Length ? text[_emitted..] : string.Empty;
        _emitted = text.Length;
        Text = text;
        return delta;
    }
}

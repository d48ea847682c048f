using System.CommandLine;
using System.Globalization;
using System.Text;
using DslaMesh.Engine.Data;
using DslaMesh.Engine.Tokenization;

namespace DslaMesh.Cli.Commands;

/// <summary><c>dslactl data …</c>: inspect and export the training data.</summary>
public static class DataCommands
{
    /// <summary>Builds <c>data</c> and its subcommands.</summary>
    public static Command Create()
    {
        var data = new Command("data", "Prepare the training corpus.");
        data.Subcommands.Add(CreatePrepare());
        return data;
    }

    private static Command CreatePrepare()
    {
        var output = new Option<DirectoryInfo>("--out", "-o") { Description = "Folder for train.txt, heldout.txt and split.tsv.", Required = true };
        var source = new Option<DirectoryInfo?>("--data") { Description = $"Brown corpus folder (default: ${BrownCorpus.EnvironmentVariable}, else {BrownCorpus.DefaultRelativePath} above the current folder)." };
        var vocab = new Option<int>("--vocab") { Description = "Also train a byte-level BPE tokenizer.json of this size on train.txt (0: don't)." };
        var command = new Command("prepare", "Write the Brown corpus as plain text with its fixed train/held-out split (and optionally a tokenizer).");
        command.Options.Add(output);
        command.Options.Add(source);
        command.Options.Add(vocab);
        command.SetAction((result, cancellationToken) => TrainCommand.GuardAsync(async () =>
        {
            var corpus = BrownCorpus.Load(result.GetValue(source)?.FullName);
            var outDir = result.GetValue(output)!.FullName;
            Directory.CreateDirectory(outDir);
            var utf8 = new UTF8Encoding(encoderShouldEmitUTF8Identifier: false);
            await File.WriteAllTextAsync(Path.Combine(outDir, "train.txt"), corpus.TrainText + "\n", utf8, cancellationToken).ConfigureAwait(false);
            await File.WriteAllTextAsync(Path.Combine(outDir, "heldout.txt"), corpus.HeldOutText + "\n", utf8, cancellationToken).ConfigureAwait(false);
            var split = new StringBuilder("id\tcategory\tsplit\tcharacters\n");
            foreach (var document in corpus.Documents)
            {
                split.Append(CultureInfo.InvariantCulture, $"{document.Id}\t{document.Category}\t{(document.IsHeldOut ? "heldout" : "train")}\t{document.Text.Length}\n");
            }
            await File.WriteAllTextAsync(Path.Combine(outDir, "split.tsv"), split.ToString(), utf8, cancellationToken).ConfigureAwait(false);
            await Console.Out.WriteLineAsync(string.Create(CultureInfo.InvariantCulture,
                $"{corpus.Directory}: {corpus.Train.Count} training documents ({utf8.GetByteCount(corpus.TrainText):N0} bytes), {corpus.HeldOut.Count} held out ({utf8.GetByteCount(corpus.HeldOutText):N0} bytes) → {outDir}")).ConfigureAwait(false);
            if (result.GetValue(vocab) is > 0 and var size)
            {
                var vocabulary = new BpeTrainer(size).Train(corpus.Train.Select(d => d.Text));
                vocabulary.WriteTokenizerJson(Path.Combine(outDir, "tokenizer.json"));
                using var tokenizer = TextTokenizer.Load(Path.Combine(outDir, "tokenizer.json"));
                var trainTokens = corpus.Train.Sum(d => (long)tokenizer.Encode(d.Text).Length);
                var heldOutTokens = corpus.HeldOut.Sum(d => (long)tokenizer.Encode(d.Text).Length);
                await Console.Out.WriteLineAsync(string.Create(CultureInfo.InvariantCulture,
                    $"tokenizer.json: {vocabulary.Count} tokens ({vocabulary.Merges.Count} merges); train {trainTokens:N0} tokens, held-out {heldOutTokens:N0} tokens ({(double)utf8.GetByteCount(corpus.TrainText) / trainTokens:F2} bytes/token)")).ConfigureAwait(false);
            }
            return ExitCodes.Ok;
        }));
        return command;
    }
}

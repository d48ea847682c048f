namespace DslaMesh.Engine.Inference;

/// <summary>How the next token is chosen and when generation stops. Validate before use.</summary>
public sealed record SamplingParameters
{
    /// <summary>0 → greedy (argmax). Otherwise logits are divided by it.</summary>
    public double Temperature { get; init; } = 1.0;

    /// <summary>Nucleus sampling mass in (0, 1]; 1 disables it.</summary>
    public double TopP { get; init; } = 1.0;

    /// <summary>Keep only the k most likely tokens; 0 disables it.</summary>
    public int TopK { get; init; }

    /// <summary>HF-style repetition penalty (≥ 1 discourages tokens already in the sequence); 1 disables it.</summary>
    public double RepetitionPenalty { get; init; } = 1.0;

    /// <summary>Seed of this request's random stream; null → a random seed.</summary>
    public long? Seed { get; init; }

    /// <summary>Most tokens to generate.</summary>
    public int MaxTokens { get; init; } = 64;

    /// <summary>Texts that end generation (not included in the output).</summary>
    public IReadOnlyList<string> StopSequences { get; init; } = [];

    /// <summary>Token ids that end generation (the model's EOS by default, see <see cref="IgnoreEos"/>).</summary>
    public IReadOnlyList<int> StopTokenIds { get; init; } = [];

    /// <summary>Keep generating past EOS (benchmarks).</summary>
    public bool IgnoreEos { get; init; }

    /// <summary>Return the log-probability of each chosen token.</summary>
    public bool LogProbs { get; init; }

    /// <summary>Greedy decoding.</summary>
    public static SamplingParameters Greedy(int maxTokens) => new() { Temperature = 0, MaxTokens = maxTokens };

    /// <summary>Whether sampling reduces to argmax.</summary>
    public bool IsGreedy => Temperature == 0 || TopK == 1;

    /// <summary>Checks every field; returns (field, problem) pairs, empty when valid.</summary>
    public IReadOnlyList<(string Field, string Problem)> Validate()
    {
        var problems = new List<(string, string)>();
        if (double.IsNaN(Temperature) || Temperature < 0 || Temperature > 100)
        {
            problems.Add(("temperature", $"must be between 0 and 100, got {Temperature}"));
        }
        if (double.IsNaN(TopP) || TopP <= 0 || TopP > 1)
        {
            problems.Add(("top_p", $"must be in (0, 1], got {TopP}"));
        }
        if (TopK < 0)
        {
            problems.Add(("top_k", $"must be ≥ 0, got {TopK}"));
        }
        if (double.IsNaN(RepetitionPenalty) || RepetitionPenalty <= 0 || RepetitionPenalty > 10)
        {
            problems.Add(("repetition_penalty", $"must be in (0, 10], got {RepetitionPenalty}"));
        }
        if (MaxTokens < 1)
        {
            problems.Add(("max_tokens", $"must be ≥ 1, got {MaxTokens}"));
        }
        if (StopSequences.Any(string.IsNullOrEmpty))
        {
            problems.Add(("stop", "stop sequences must be non-empty strings"));
        }
        return problems;
    }

    /// <summary>Throws <see cref="ArgumentException"/> naming the first bad field.</summary>
    public void EnsureValid()
    {
        var problems = Validate();
        if (problems.Count > 0)
        {
            throw new InvalidSamplingException(problems[0].Field, problems[0].Problem);
        }
    }
}

/// <summary>A sampling parameter is out of range; <see cref="Field"/> names it.</summary>
public sealed class InvalidSamplingException : ArgumentException
{
    public InvalidSamplingException(string field, string problem) : base($"{field}: {problem}", field) => Field = field;
    public InvalidSamplingException() { Field = ""; }
    public InvalidSamplingException(string message) : base(message) { Field = ""; }
    public InvalidSamplingException(string message, Exception inner) : base(message, inner) { Field = ""; }

    /// <summary>The offending field (OpenAI request names: temperature, top_p, …).</summary>
    public string Field { get; }
}

using System.Globalization;
using DslaMesh.Engine.Training;
using Spectre.Console;

namespace DslaMesh.Cli.Commands;

/// <summary>
/// How training-like commands (<c>train</c>, <c>distill</c>, <c>eval</c>) show progress: a Spectre.Console progress bar
/// with loss, throughput and ETA on an interactive terminal, plain lines (at most one progress line every 10 s) when the
/// output is redirected.
/// </summary>
internal static class TrainingDisplay
{
    /// <summary>Runs <paramref name="body"/> with the observer that suits the terminal.</summary>
    public static T Run<T>(Func<ITrainingObserver, T> body)
    {
        var interactive = AnsiConsole.Profile.Capabilities.Interactive && !Console.IsOutputRedirected;
        if (!interactive)
        {
            return body(new LineObserver(TimeSpan.FromSeconds(10)));
        }
        return AnsiConsole.Progress()
            .AutoClear(false)
            .HideCompleted(false)
            .Columns(new TaskDescriptionColumn { Alignment = Justify.Left }, new ProgressBarColumn(), new PercentageColumn(), new SpinnerColumn())
            .Start(ctx => body(new ProgressObserver(ctx)));
    }

    public static string Format(TrainingProgress p) => string.Create(CultureInfo.InvariantCulture,
        $"step {p.Step}/{p.TotalSteps} · loss {p.Loss:F4} · lr {p.LearningRate:0.###e0} · |g| {p.GradNorm:F2} · {p.TokensPerSecond:N0} tok/s · epoch {p.Epoch:F2} · ETA {FormatSpan(p.Remaining)}");

    public static string Format(EvaluationResult e) => string.Create(CultureInfo.InvariantCulture,
        $"step {e.Step}: held-out loss {e.Loss:F4}, perplexity {e.Perplexity:F2} over {e.Tokens:N0} tokens{(e.IsBest ? " (best)" : "")}");

    public static string FormatSpan(TimeSpan span) => span.TotalHours >= 1
        ? string.Create(CultureInfo.InvariantCulture, $"{(int)span.TotalHours}:{span.Minutes:00}:{span.Seconds:00}")
        : string.Create(CultureInfo.InvariantCulture, $"{span.Minutes}:{span.Seconds:00}");

    /// <summary>A Spectre.Console progress bar; messages and evaluations print above it.</summary>
    private sealed class ProgressObserver(ProgressContext context) : ITrainingObserver
    {
        private ProgressTask? _task;
        private string _lastEvaluation = "";

        public void OnMessage(string message) => AnsiConsole.MarkupLine(Markup.Escape(message));

        public void OnProgress(TrainingProgress progress)
        {
            _task ??= context.AddTask("training", maxValue: progress.TotalSteps);
            _task.MaxValue = progress.TotalSteps;
            _task.Value = progress.Step;
            _task.Description = Markup.Escape(string.Create(CultureInfo.InvariantCulture,
                $"step {progress.Step}/{progress.TotalSteps} · loss {progress.Loss:F3} · {progress.TokensPerSecond:N0} tok/s · ETA {FormatSpan(progress.Remaining)}{_lastEvaluation}"));
        }

        public void OnEvaluation(EvaluationResult evaluation)
        {
            _lastEvaluation = string.Create(CultureInfo.InvariantCulture, $" · held-out {evaluation.Loss:F3}");
            AnsiConsole.MarkupLine(Markup.Escape(Format(evaluation)));
        }

        public void OnCheckpoint(int step, string directory) =>
            AnsiConsole.MarkupLine(Markup.Escape($"step {step}: checkpoint written to {directory}"));
    }

    /// <summary>Plain lines for logs and redirected output: a progress line at most every <c>interval</c>.</summary>
    private sealed class LineObserver(TimeSpan interval) : ITrainingObserver
    {
        private DateTime _last = DateTime.MinValue;

        public void OnMessage(string message) => Console.WriteLine(message);

        public void OnProgress(TrainingProgress progress)
        {
            var now = DateTime.UtcNow;
            if (now - _last >= interval || progress.Step == progress.TotalSteps || _last == DateTime.MinValue)
            {
                Console.WriteLine(Format(progress));
                _last = now;
            }
        }

        public void OnEvaluation(EvaluationResult evaluation) => Console.WriteLine(Format(evaluation));

        public void OnCheckpoint(int step, string directory) => Console.WriteLine($"step {step}: checkpoint written to {directory}");
    }
}

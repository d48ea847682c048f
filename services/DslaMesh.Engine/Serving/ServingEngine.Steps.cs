using System.Diagnostics;
using DslaMesh.Engine.Dsla;
using DslaMesh.Engine.Inference;
using static TorchSharp.torch;

namespace DslaMesh.Engine.Serving;

public sealed partial class ServingEngine
{
    private bool ApplyCommands()
    {
        var applied = false;
        while (_commands.TryDequeue(out var command))
        {
            applied = true;
            if (command.Epoch < _epoch)
            {
                command.Completion.TrySetResult(new ConversionResult(false, $"stale epoch {command.Epoch}: epoch {_epoch} is already applied", _epoch, DslaLayers(), 0));
                continue;
            }
            var unknown = command.DslaByLayer.Keys.Where(l => l < 0 || l >= _mix.Length).ToList();
            var missing = command.DslaByLayer.Where(kv => kv.Value && kv.Key >= 0 && kv.Key < _mix.Length && _model.Layers[kv.Key].Replacement is null).Select(kv => kv.Key).ToList();
            if (unknown.Count > 0 || missing.Count > 0)
            {
                var reason = unknown.Count > 0
                    ? $"layers {string.Join(",", unknown)} do not exist (the model has {_mix.Length})"
                    : $"layers {string.Join(",", missing)} have no DSLA weights";
                command.Completion.TrySetResult(new ConversionResult(false, reason, _epoch, DslaLayers(), 0));
                continue;
            }
            var started = Stopwatch.GetTimestamp();
            foreach (var (layer, dsla) in command.DslaByLayer.OrderBy(kv => kv.Key))
            {
                SetLayer(layer, dsla);
            }
            _epoch = command.Epoch;
            var stall = Stopwatch.GetElapsedTime(started).TotalSeconds;
            _observer.OnConversionApplied(stall);
            command.Completion.TrySetResult(new ConversionResult(true, null, _epoch, DslaLayers(), stall));
        }
        return applied;
    }

    /// <summary>
    /// Flips one layer for the service. Converting folds the layer's KV cache of every in-flight sequence whose
    /// fidelity allows DSLA into its DSLA state (freeing the KV memory); reverting serves new requests with attention
    /// while in-flight ones finish that layer on DSLA (their KV for it no longer exists).
    /// </summary>
    private void SetLayer(int layer, bool dsla)
    {
        if (_mix[layer] == dsla)
        {
            return;
        }
        _mix[layer] = dsla;
        _observer.OnLayerChanged(layer, dsla);
        if (!dsla)
        {
            return;
        }
        var eligible = _active.Where(s => !s.Mix[layer] && s.AcceptsAnotherDslaLayer()).ToList();
        if (_model.Layers[layer].Replacement is GatedLinearMixer { CanFold: true } mixer)
        {
            mixer.FoldLayer(eligible.Select(s => s.Cache).ToList(), layer);   // one batched fold; frees their KV for the layer
        }
        foreach (var sequence in eligible)
        {
            // A sequence whose history cannot be folded keeps attention for this layer until it finishes.
            if (sequence.Cache[layer] is not KvState)
            {
                sequence.SwitchToDsla(layer);
            }
        }
    }

    private void Admit()
    {
        while (_incoming.TryDequeue(out var request))
        {
            _waiting.AddLast(request);
        }
        for (var node = _waiting.First; node is not null;)
        {
            var next = node.Next;
            if (node.Value.CancellationToken.IsCancellationRequested)
            {
                _waiting.Remove(node);
                Interlocked.Decrement(ref _queued);
                Finish(node.Value, FinishReason.Cancelled, null);
            }
            node = next;
        }
        while (_waiting.First is { } head && _active.Count < _options.MaxBatchSize)
        {
            var mix = MixFor(head.Value.Fidelity);
            var needed = EstimateKvBytes(head.Value, mix);
            if (_options.KvBudgetBytes > 0 && KvBytesInUse() + needed > _options.KvBudgetBytes && _active.Count > 0)
            {
                if (!ConvertUnderPressure())
                {
                    break;   // wait for running sequences to finish
                }
                continue;
            }
            _waiting.RemoveFirst();
            Interlocked.Decrement(ref _queued);
            _active.Add(new ActiveSequence(head.Value, mix, _model, _tokenizer));
        }
    }

    private bool ConvertUnderPressure()
    {
        if (!_options.ConvertUnderPressure)
        {
            return false;
        }
        var cap = (int)Math.Floor(_options.MaxDslaFraction * _mix.Length);
        if (_mix.Count(m => m) >= cap)
        {
            return false;
        }
        var layer = _conversionOrder.FirstOrDefault(l => !_mix[l] && _model.Layers[l].Replacement is not null, -1);
        if (layer < 0)
        {
            return false;
        }
        var started = Stopwatch.GetTimestamp();
        SetLayer(layer, true);
        _observer.OnConversionApplied(Stopwatch.GetElapsedTime(started).TotalSeconds);
        return true;
    }

    private bool Prefill()
    {
        var sequence = _active.FirstOrDefault(s => !s.PrefillDone && !s.Request.CancellationToken.IsCancellationRequested);
        if (sequence is null)
        {
            return false;
        }
        using var scope = NewDisposeScope();
        var prompt = sequence.Request.PromptIds;
        var count = Math.Min(_options.PrefillChunkTokens, prompt.Count - sequence.PromptProcessed);
        var ids = new long[count];
        for (var i = 0; i < count; i++)
        {
            ids[i] = prompt[sequence.PromptProcessed + i];
        }
        if (sequence.PromptProcessed == 0)
        {
            sequence.RecordPrefillMix();
            sequence.StartedTimestamp = Stopwatch.GetTimestamp();
        }
        var logits = _model.Forward(tensor(ids, device: _model.Device).unsqueeze(0), [sequence.Cache], sequence.Mix, lastPositionOnly: true);
        sequence.PromptProcessed += count;
        if (sequence.PrefillDone)
        {
            Emit(sequence, sequence.Stream.Sample(logits[0, 0]));
        }
        return true;
    }

    private bool Decode()
    {
        var ready = _active.Where(s => s.PrefillDone && s.NextToken is not null && !s.Finished && !s.Request.CancellationToken.IsCancellationRequested).ToList();
        if (ready.Count == 0)
        {
            return false;
        }
        foreach (var group in ready.GroupBy(s => s.MixKey))
        {
            var batch = group.ToList();
            using var scope = NewDisposeScope();
            var ids = tensor(batch.Select(s => (long)s.NextToken!.Value).ToArray(), device: _model.Device).unsqueeze(1);
            var logits = _model.Forward(ids, batch.Select(s => s.Cache).ToList(), batch[0].Mix, lastPositionOnly: true);
            for (var row = 0; row < batch.Count; row++)
            {
                batch[row].RecordDecodeMix();
                Emit(batch[row], batch[row].Stream.Sample(logits[row, 0]));
            }
        }
        return true;
    }

    private void Emit(ActiveSequence sequence, (int Token, float LogProb) choice)
    {
        var now = Stopwatch.GetTimestamp();
        if (sequence.FirstTokenTimestamp == 0)
        {
            sequence.FirstTokenTimestamp = now;
            _observer.OnFirstToken(Stopwatch.GetElapsedTime(sequence.Request.SubmittedTimestamp, now).TotalSeconds);
        }
        else
        {
            _observer.OnInterTokenLatency(Stopwatch.GetElapsedTime(sequence.LastTokenTimestamp, now).TotalSeconds);
        }
        sequence.LastTokenTimestamp = now;
        var token = sequence.Stream.Accept(choice.Token, choice.LogProb);
        sequence.Request.Events.Writer.TryWrite(new TokenEvent(token.Id, token.Text, token.LogProb));
        sequence.NextToken = token.Finish is null ? token.Id : null;
        if (token.Finish is { } reason)
        {
            sequence.Finished = true;
            Finish(sequence.Request, reason, sequence);
        }
    }

    private void Reap()
    {
        for (var i = _active.Count - 1; i >= 0; i--)
        {
            var sequence = _active[i];
            if (!sequence.Finished && sequence.Request.CancellationToken.IsCancellationRequested)
            {
                sequence.Finished = true;
                Finish(sequence.Request, FinishReason.Cancelled, sequence);
            }
            if (sequence.Finished)
            {
                sequence.Dispose();   // frees the sequence's KV and DSLA memory at this token boundary
                _active.RemoveAt(i);
            }
        }
    }

    private void Finish(GenerationRequest request, FinishReason reason, ActiveSequence? sequence)
    {
        var now = Stopwatch.GetTimestamp();
        var total = Stopwatch.GetElapsedTime(request.SubmittedTimestamp, now).TotalSeconds;
        var queue = sequence is { StartedTimestamp: > 0 } ? Stopwatch.GetElapsedTime(request.SubmittedTimestamp, sequence.StartedTimestamp).TotalSeconds : total;
        var ttft = sequence is { FirstTokenTimestamp: > 0 } ? Stopwatch.GetElapsedTime(request.SubmittedTimestamp, sequence.FirstTokenTimestamp).TotalSeconds : 0;
        var receipt = sequence?.Receipt(Variant) ?? new ConversionReceipt([], [], _mix.Length, 0, Variant, []);
        var usage = new GenerationUsage(request.PromptIds.Count, sequence?.Stream.Generated.Count ?? 0);
        _observer.OnRequestFinished(total, reason, usage, receipt.KvBytesSaved);
        request.Events.Writer.TryWrite(new CompletionEvent(reason, usage, new GenerationTimings(queue, ttft, total), receipt));
        request.Events.Writer.TryComplete();
    }

    private void FailAll(Exception error)
    {
        var retryable = error is OperationCanceledException;
        foreach (var sequence in _active)
        {
            sequence.Request.Events.Writer.TryWrite(new ErrorEvent(error.Message, retryable));
            sequence.Request.Events.Writer.TryComplete();
            sequence.Dispose();
        }
        _active.Clear();
        if (!retryable)
        {
            return;
        }
        while (_incoming.TryDequeue(out var request))
        {
            _waiting.AddLast(request);
        }
        foreach (var request in _waiting)
        {
            request.Events.Writer.TryWrite(new ErrorEvent(error.Message, retryable));
            request.Events.Writer.TryComplete();
        }
        _waiting.Clear();
    }

    /// <summary>The layer mix a new request gets from the service mix and its fidelity.</summary>
    private bool[] MixFor(Fidelity fidelity)
    {
        var layers = _mix.Length;
        var mix = new bool[layers];
        if (fidelity.Mode == FidelityMode.Exact)
        {
            return mix;
        }
        var limit = fidelity.MaxDslaFraction is { } fraction ? (int)Math.Floor(fraction * layers) : layers;
        if (fidelity.Mode == FidelityMode.Fast)
        {
            limit = Math.Min(limit, (int)Math.Floor(_options.MaxDslaFraction * layers));
        }
        var taken = 0;
        foreach (var layer in _conversionOrder)
        {
            if (taken >= limit)
            {
                break;
            }
            var wanted = fidelity.Mode == FidelityMode.Fast || _mix[layer];
            if (wanted && _model.Layers[layer].Replacement is not null)
            {
                mix[layer] = true;
                taken++;
            }
        }
        return mix;
    }

    private long KvBytesPerToken => 2L * _model.Config.NumKeyValueHeads * _model.Config.HeadDim * _model.Embeddings.ElementSize;

    private long EstimateKvBytes(GenerationRequest request, bool[] mix) =>
        mix.Count(m => !m) * KvBytesPerToken * (request.PromptIds.Count + request.Sampling.MaxTokens);

    private long KvBytesInUse() => _active.Sum(s => s.KvBytes(KvBytesPerToken));

    private int[] DslaLayers() => Enumerable.Range(0, _mix.Length).Where(l => _mix[l]).ToArray();

    private EngineSnapshot BuildSnapshot(int waiting, int running)
    {
        var promptLengths = _active.Select(s => s.Request.PromptIds.Count).Concat(_waiting.Select(r => r.PromptIds.Count)).ToArray();
        return new EngineSnapshot(
            _epoch,
            DslaLayers(),
            _mix.Length,
            waiting,
            running,
            KvBytesInUse(),
            _options.KvBudgetBytes,
            promptLengths,
            _draining);
    }
}

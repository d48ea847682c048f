using System.Net.Http.Headers;
using DslaMesh.Gateway.Hosting;
using DslaMesh.Gateway.Routing;
using Microsoft.AspNetCore.Http.Features;
using Microsoft.Extensions.Options;
using Yarp.ReverseProxy.Forwarder;
using Yarp.ReverseProxy.Model;
using Yarp.ReverseProxy.Transforms;

namespace DslaMesh.Gateway.Proxy;

/// <summary>
/// The first step of the proxy pipeline, around load balancing and forwarding:
/// <list type="number">
/// <item>reads the (size-limited) request body once, so that routing can see the prompt length, fidelity and model
/// (<see cref="RequestTraits"/>) and a request can be sent again;</item>
/// <item>sends a request to another replica when its replica could not take it: the connection failed, or the replica
/// answered draining/loading (503, UNAVAILABLE) or queue full (429, RESOURCE_EXHAUSTED) before producing anything;</item>
/// <item>turns proxy failures into answers clients understand: OpenAI JSON errors or gRPC statuses before the
/// response started, and for a replica that dies mid-stream an SSE error event (then <c>[DONE]</c>) or gRPC
/// UNAVAILABLE trailers instead of a connection reset.</item>
/// </list>
/// </summary>
public sealed partial class MeshProxyMiddleware
{
    /// <summary>Response header naming the replica that served the request.</summary>
    public const string ReplicaHeader = "x-dslamesh-replica";

    private readonly GatewayOptions _options;
    private readonly ILogger<MeshProxyMiddleware> _logger;

    public MeshProxyMiddleware(IOptions<GatewayOptions> options, ILogger<MeshProxyMiddleware> logger)
    {
        ArgumentNullException.ThrowIfNull(options);
        _options = options.Value;
        _logger = logger;
    }

    /// <summary>Runs the rest of the proxy pipeline (load balancing, passive health, forwarding) once or more.</summary>
    public async Task InvokeAsync(HttpContext context, RequestDelegate next)
    {
        ArgumentNullException.ThrowIfNull(context);
        ArgumentNullException.ThrowIfNull(next);
        var grpc = GatewayResponses.IsGrpc(context.Request);
        var body = await ReadBodyAsync(context, grpc).ConfigureAwait(false);
        if (body is null)
        {
            return;
        }
        var attempt = new AttemptState();
        context.Features.Set(attempt);
        var held = HeldTermination.Install(context);
        var proxy = context.GetReverseProxyFeature();
        var cluster = context.GetRouteModel().Cluster!;
        List<string>? tried = null;
        for (var n = 1; ; n++)
        {
            attempt.CanRetry = n < _options.MaxAttempts && Untried(cluster, tried).Count > 1;
            await next(context).ConfigureAwait(false);
            var error = context.Features.Get<IForwarderErrorFeature>();
            if (context.Response.HasStarted || proxy.ProxiedDestination is not { } destination || !attempt.CanRetry
                || !(attempt.RetryableAnswer || IsConnectFailure(error)))
            {
                break;
            }
            (tried ??= []).Add(destination.DestinationId);
            Log.Retrying(_logger, destination.DestinationId, attempt.RetryableAnswer ? $"answered {context.Response.StatusCode} {attempt.GrpcStatus}" : error!.Error.ToString(), n + 1);
            context.Response.Clear();
            context.Features.Set<IForwarderErrorFeature>(null);
            attempt.RetryableAnswer = false;
            attempt.GrpcStatus = null;
            body.Position = 0;
            proxy.ProxiedDestination = null;
            proxy.AvailableDestinations = Untried(cluster, tried);
        }
        await FinishAsync(context, held).ConfigureAwait(false);
    }

    /// <summary>The response transform: names the replica, and holds back a "cannot take it" answer when a retry is possible.</summary>
    public static ValueTask OnResponse(ResponseTransformContext transform)
    {
        ArgumentNullException.ThrowIfNull(transform);
        var context = transform.HttpContext;
        if (context.GetReverseProxyFeature().ProxiedDestination is { } destination)
        {
            context.Response.Headers[ReplicaHeader] = destination.DestinationId;
        }
        if (transform.ProxyResponse is { } response && context.Features.Get<AttemptState>() is { CanRetry: true } attempt
            && (response.StatusCode is System.Net.HttpStatusCode.ServiceUnavailable or System.Net.HttpStatusCode.TooManyRequests
                || GrpcStatus(response.Headers) is "14" or "8"))
        {
            attempt.RetryableAnswer = true;
            attempt.GrpcStatus = GrpcStatus(response.Headers);
            transform.SuppressResponseBody = true;
        }
        return default;
    }

    private static string? GrpcStatus(HttpResponseHeaders headers) =>
        headers.NonValidated.TryGetValues("grpc-status", out var values) ? values.ToString() : null;

    private async Task<MemoryStream?> ReadBodyAsync(HttpContext context, bool grpc)
    {
        var request = context.Request;
        if (request.ContentLength > _options.MaxRequestBodyBytes)
        {
            await RejectTooLargeAsync(context).ConfigureAwait(false);
            return null;
        }
        byte[] bytes;
        int length;
        try
        {
            if (request.ContentLength is { } known)
            {
                bytes = new byte[known];
                await request.Body.ReadExactlyAsync(bytes, context.RequestAborted).ConfigureAwait(false);
                length = bytes.Length;
            }
            else
            {
                using var buffer = new MemoryStream();
                await request.Body.CopyToAsync(buffer, context.RequestAborted).ConfigureAwait(false);
                bytes = buffer.GetBuffer();
                length = (int)buffer.Length;
            }
        }
        catch (BadHttpRequestException e) when (e.StatusCode == StatusCodes.Status413PayloadTooLarge)
        {
            await RejectTooLargeAsync(context).ConfigureAwait(false);
            return null;
        }
        catch (Exception e) when (e is OperationCanceledException or IOException or BadHttpRequestException)
        {
            return null;   // the client went away or sent a broken body
        }
        var span = bytes.AsSpan(0, length);
        context.Features.Set(grpc
            ? RequestTraits.FromGrpcFrame(span, _options.Routing.BytesPerToken)
            : length > 0 && request.ContentType?.Contains("json", StringComparison.OrdinalIgnoreCase) == true
                ? RequestTraits.FromOpenAiJson(span, _options.Routing.BytesPerToken)
                : RequestTraits.Unknown);
        var body = new MemoryStream(bytes, 0, length, writable: false, publiclyVisible: true);
        request.Body = body;
        return body;
    }

    /// <summary>
    /// 413 for a body over the limit. The body is left unread, so the HTTP/1.1 connection is closed after the answer
    /// (<c>Connection: close</c>): a client must not send its next request on a connection whose previous body the
    /// server abandoned, or that request meets a connection closing under it.
    /// </summary>
    private Task RejectTooLargeAsync(HttpContext context)
    {
        if (HttpProtocol.IsHttp11(context.Request.Protocol) || HttpProtocol.IsHttp10(context.Request.Protocol))
        {
            // At response start: WriteAsync clears the headers before writing the error.
            context.Response.OnStarting(() =>
            {
                context.Response.Headers.Connection = "close";
                return Task.CompletedTask;
            });
        }
        return GatewayResponses.WriteAsync(context, GatewayError.TooLarge, $"The request body is larger than the gateway's limit of {_options.MaxRequestBodyBytes} bytes.");
    }

    private static IReadOnlyList<DestinationState> Untried(ClusterState cluster, List<string>? tried)
    {
        var available = cluster.DestinationsState.AvailableDestinations;
        return tried is null ? available : [.. available.Where(d => !tried.Contains(d.DestinationId))];
    }

    /// <summary>Connect refused or timed out: the replica never saw the request, so sending it elsewhere is safe.</summary>
    private static bool IsConnectFailure(IForwarderErrorFeature? error)
    {
        if (error?.Error is not (ForwarderError.Request or ForwarderError.RequestTimedOut))
        {
            return false;
        }
        for (var e = error.Exception; e is not null; e = e.InnerException)
        {
            if (e is HttpRequestException { HttpRequestError: HttpRequestError.ConnectionError or HttpRequestError.NameResolutionError } or TimeoutException
                || e is System.Net.Sockets.SocketException)
            {
                return true;
            }
        }
        return false;
    }

    private async Task FinishAsync(HttpContext context, HeldTermination held)
    {
        var error = context.Features.Get<IForwarderErrorFeature>();
        var replica = context.GetReverseProxyFeature().ProxiedDestination?.DestinationId ?? "(none)";
        if (error is null || error.Error == ForwarderError.None)
        {
            held.Release();
            return;
        }
        if (!context.Response.HasStarted)
        {
            held.Discard();
            var (kind, message, retryAfter) = error.Error switch
            {
                ForwarderError.NoAvailableDestinations => (GatewayError.Unavailable, "No model service is available for this request right now; retry shortly.", TimeSpan.FromSeconds(1)),
                ForwarderError.RequestTimedOut => (GatewayError.Timeout, $"Model service {replica} did not answer within the gateway's timeout.", (TimeSpan?)null),
                ForwarderError.RequestCanceled or ForwarderError.RequestBodyCanceled or ForwarderError.RequestBodyClient => (null, "", null),
                _ => (GatewayError.BadGateway, $"Model service {replica} failed before answering ({error.Error}); the request can be retried.", TimeSpan.FromSeconds(1)),
            };
            if (kind is not null && !context.RequestAborted.IsCancellationRequested)
            {
                Log.Failed(_logger, replica, error.Error, kind.HttpStatus);
                await GatewayResponses.WriteAsync(context, kind, message, retryAfter).ConfigureAwait(false);
            }
            return;
        }
        if (error.Error == ForwarderError.ResponseBodyDestination && !context.RequestAborted.IsCancellationRequested
            && await GatewayResponses.TryEndStreamAsync(context, GatewayError.BadGateway, $"Model service {replica} failed mid-stream; the request can be retried.").ConfigureAwait(false))
        {
            held.Discard();
            Log.StreamBroken(_logger, replica);
            return;
        }
        held.Release();
    }

    /// <summary>Per-request retry state, shared with the response transform.</summary>
    private sealed class AttemptState
    {
        public bool CanRetry { get; set; }
        public bool RetryableAnswer { get; set; }
        public string? GrpcStatus { get; set; }
    }

    /// <summary>
    /// Holds back YARP's reset or abort of a response whose replica failed mid-stream, so that the stream can end with
    /// a protocol-level error instead; performs it when nothing better can be sent.
    /// </summary>
    private sealed class HeldTermination : IHttpRequestLifetimeFeature, IHttpResetFeature
    {
        private readonly IHttpRequestLifetimeFeature _lifetime;
        private readonly IHttpResetFeature? _reset;
        private int? _resetCode;
        private bool _abort;

        private HeldTermination(IHttpRequestLifetimeFeature lifetime, IHttpResetFeature? reset)
        {
            _lifetime = lifetime;
            _reset = reset;
        }

        public CancellationToken RequestAborted
        {
            get => _lifetime.RequestAborted;
            set => _lifetime.RequestAborted = value;
        }

        public static HeldTermination Install(HttpContext context)
        {
            var held = new HeldTermination(context.Features.GetRequiredFeature<IHttpRequestLifetimeFeature>(), context.Features.Get<IHttpResetFeature>());
            context.Features.Set<IHttpRequestLifetimeFeature>(held);
            if (held._reset is not null)
            {
                context.Features.Set<IHttpResetFeature>(held);
            }
            return held;
        }

        public void Abort() => _abort = true;

        public void Reset(int errorCode) => _resetCode = errorCode;

        /// <summary>Performs what was held back.</summary>
        public void Release()
        {
            if (_resetCode is { } code && _reset is not null)
            {
                _reset.Reset(code);
            }
            else if (_abort || _resetCode is not null)
            {
                _lifetime.Abort();
            }
            Discard();
        }

        /// <summary>Forgets what was held back.</summary>
        public void Discard()
        {
            _resetCode = null;
            _abort = false;
        }
    }

    private static partial class Log
    {
        [LoggerMessage(400, LogLevel.Information, "Replica {Replica} could not take the request ({Reason}); trying another (attempt {Attempt})", EventName = "RetryingOnAnotherReplica")]
        public static partial void Retrying(ILogger logger, string replica, string reason, int attempt);

        [LoggerMessage(401, LogLevel.Warning, "Proxying to {Replica} failed ({Error}); answered {Status}", EventName = "ProxyFailed")]
        public static partial void Failed(ILogger logger, string replica, ForwarderError error, int status);

        [LoggerMessage(402, LogLevel.Warning, "Replica {Replica} failed mid-stream; ended the client's stream with a retryable error", EventName = "StreamBroken")]
        public static partial void StreamBroken(ILogger logger, string replica);
    }
}

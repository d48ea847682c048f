using System.Security.Cryptography;
using System.Text;
using DslaMesh.Controller.Hosting;
using Grpc.Core;
using Grpc.Core.Interceptors;
using Microsoft.Extensions.Options;

namespace DslaMesh.Controller.Admin;

/// <summary>
/// Lets an admin call through only with metadata <c>authorization: Bearer &lt;token&gt;</c> matching the configured token
/// (compared in constant time); anything else is UNAUTHENTICATED.
/// </summary>
public sealed partial class AdminTokenInterceptor : Interceptor
{
    private readonly byte[] _expected;
    private readonly ILogger<AdminTokenInterceptor> _logger;

    public AdminTokenInterceptor(IOptions<ControllerOptions> options, ILogger<AdminTokenInterceptor> logger)
    {
        _expected = Encoding.UTF8.GetBytes(options.Value.AdminToken ?? throw new InvalidOperationException("no admin token configured"));
        _logger = logger;
    }

    /// <inheritdoc/>
    public override Task<TResponse> UnaryServerHandler<TRequest, TResponse>(TRequest request, ServerCallContext context, UnaryServerMethod<TRequest, TResponse> continuation)
    {
        ArgumentNullException.ThrowIfNull(context);
        ArgumentNullException.ThrowIfNull(continuation);
        Authenticate(context);
        return continuation(request, context);
    }

    private void Authenticate(ServerCallContext context)
    {
        var header = context.RequestHeaders.GetValue("authorization");
        const string Scheme = "Bearer ";
        if (header is null || !header.StartsWith(Scheme, StringComparison.OrdinalIgnoreCase))
        {
            Log.Refused(_logger, context.Method, context.Peer, "no bearer token");
            throw new RpcException(new Status(StatusCode.Unauthenticated, "an admin token is required: metadata 'authorization: Bearer <token>' (dslactl --token or DSLAMESH_ADMIN_TOKEN)"));
        }
        var given = Encoding.UTF8.GetBytes(header[Scheme.Length..].Trim());
        if (!CryptographicOperations.FixedTimeEquals(given, _expected))
        {
            Log.Refused(_logger, context.Method, context.Peer, "wrong token");
            throw new RpcException(new Status(StatusCode.Unauthenticated, "the admin token is not valid"));
        }
    }

    private static partial class Log
    {
        [LoggerMessage(60, LogLevel.Warning, "Admin call {Method} from {Peer} refused: {Reason}", EventName = "AdminUnauthenticated")]
        public static partial void Refused(ILogger logger, string method, string peer, string reason);
    }
}

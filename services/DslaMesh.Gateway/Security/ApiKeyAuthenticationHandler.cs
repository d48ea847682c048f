using System.Text.Encodings.Web;
using DslaMesh.Gateway.Proxy;
using Microsoft.AspNetCore.Authentication;
using Microsoft.Extensions.Options;

namespace DslaMesh.Gateway.Security;

/// <summary>
/// Authenticates <c>Authorization: Bearer KEY</c> or <c>x-api-key: KEY</c> against <see cref="ApiKeyStore"/>, and
/// answers challenges the way each client expects: 401 with an OpenAI error body, or gRPC UNAUTHENTICATED.
/// </summary>
public sealed partial class ApiKeyAuthenticationHandler : AuthenticationHandler<AuthenticationSchemeOptions>
{
    private readonly ApiKeyStore _keys;

    public ApiKeyAuthenticationHandler(IOptionsMonitor<AuthenticationSchemeOptions> options, ILoggerFactory logger, UrlEncoder encoder, ApiKeyStore keys)
        : base(options, logger, encoder) => _keys = keys;

    /// <inheritdoc/>
    protected override Task<AuthenticateResult> HandleAuthenticateAsync()
    {
        var presented = ApiKeyStore.Presented(Request);
        if (presented.IsEmpty)
        {
            return Task.FromResult(AuthenticateResult.NoResult());
        }
        return Task.FromResult(_keys.TryGet(presented, out var tenant)
            ? AuthenticateResult.Success(new AuthenticationTicket(tenant.Principal, ApiKeyDefaults.Scheme))
            : AuthenticateResult.Fail("invalid API key"));
    }

    /// <inheritdoc/>
    protected override Task HandleChallengeAsync(AuthenticationProperties properties)
    {
        var missing = ApiKeyStore.Presented(Request).IsEmpty;
        Log.Rejected(Logger, missing ? "missing" : "invalid", Request.Path);
        return GatewayResponses.WriteAsync(Context, GatewayError.Unauthenticated, missing
            ? "You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY' or 'x-api-key: YOUR_KEY'."
            : "Incorrect API key provided.");
    }

    private static partial class Log
    {
        [LoggerMessage(300, LogLevel.Information, "Rejected a request to {Path}: {Reason} API key", EventName = "ApiKeyRejected")]
        public static partial void Rejected(ILogger logger, string reason, PathString path);
    }
}

using Microsoft.AspNetCore.Hosting.Server;
using Microsoft.AspNetCore.Hosting.Server.Features;
using Microsoft.Extensions.Options;

namespace DslaMesh.ModelService.Hosting;

/// <summary>This replica's id and the address it advertises (known once Kestrel has bound its ports).</summary>
public sealed class ServiceIdentity
{
    private readonly IServer _server;
    private readonly ModelServiceOptions _options;
    private string? _address;

    public ServiceIdentity(IServer server, IOptions<ModelServiceOptions> options)
    {
        _server = server;
        _options = options.Value;
    }

    /// <summary>The address clients and the controller use, e.g. <c>http://127.0.0.1:5101</c>.</summary>
    public string Address => _address ??= _options.AdvertisedAddress
        ?? _server.Features.Get<IServerAddressesFeature>()?.Addresses.FirstOrDefault()?.Replace("0.0.0.0", "127.0.0.1", StringComparison.Ordinal).Replace("[::]", "127.0.0.1", StringComparison.Ordinal)
        ?? "http://127.0.0.1";

    /// <summary>The replica id.</summary>
    public string Id => _options.ServiceId ?? $"{Environment.MachineName}-{new Uri(Address).Port}".ToLowerInvariant();
}

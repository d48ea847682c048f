using System.Reflection;
using DslaMesh.Gateway.Hosting;
using DslaMesh.ModelService.Hosting;
using DslaMesh.Tests.Common;
using Microsoft.AspNetCore.Builder;
using Microsoft.AspNetCore.Routing;
using Microsoft.Extensions.Configuration;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Options;
using YamlDotNet.RepresentationModel;

namespace DslaMesh.Gateway.Tests;

/// <summary>
/// deploy/k8s against the services' real configuration: every environment key a container gets (env, ConfigMaps,
/// Secrets) binds to a property of the right options class with no unknown keys and passes its validator; Kestrel
/// endpoints match the container ports; probes hit paths the service really maps, on ports it really serves HTTP/1.1 on.
/// </summary>
public sealed class ManifestTests
{
    private static readonly string Folder = Path.Combine(RepoPaths.Root, "deploy", "k8s");

    /// <summary>Sections a service does not bind yet: the controller is being completed on its own branch.</summary>
    private static readonly Dictionary<string, string[]> Pending = new() { ["controller"] = ["Redis", "Controller"] };

    private readonly List<YamlMappingNode> _documents = [.. Directory.GetFiles(Folder, "*.yaml").Where(f => !f.EndsWith("kustomization.yaml", StringComparison.Ordinal))
        .SelectMany(Load)];

    public static TheoryData<string> Services => ["gateway", "model-service", "controller"];

    [Fact]
    public void Kustomization_lists_every_manifest_and_sets_up_gpu_replicas()
    {
        var kustomization = Load(Path.Combine(Folder, "kustomization.yaml")).Single();
        var resources = ((YamlSequenceNode)kustomization["resources"]).Select(n => n.ToString()).ToHashSet();
        var files = Directory.GetFiles(Folder, "*.yaml").Select(Path.GetFileName).Where(f => f != "kustomization.yaml").ToHashSet();
        Assert.Equal(files.Order(), resources.Order());

        var container = Container("model-service");
        Assert.Equal("1", Scalar(container, "resources", "limits", "nvidia.com/gpu"));
        Assert.Equal("1", Scalar(container, "resources", "requests", "nvidia.com/gpu"));
        Assert.Contains("kill -TERM 1", ((YamlSequenceNode)container["lifecycle"]["preStop"]["exec"]["command"]).Last().ToString(), StringComparison.Ordinal);
        foreach (var dockerfile in new[] { "gateway", "controller", "model-service" })
        {
            Assert.True(File.Exists(Path.Combine(RepoPaths.Root, "deploy", "docker", $"{dockerfile}.Dockerfile")), $"no Dockerfile for {dockerfile}");
        }
    }

    [Theory]
    [MemberData(nameof(Services))]
    public void Every_configuration_key_binds_to_the_service_options_and_validates(string service)
    {
        var environment = Environment(service);
        var assembly = service switch
        {
            "gateway" => typeof(GatewayOptions).Assembly,
            "model-service" => typeof(ModelServiceOptions).Assembly,
            _ => Assembly.Load("DslaMesh.Controller"),
        };
        var sections = assembly.GetTypes()
            .Select(t => (Type: t, Field: t.GetField("SectionName", BindingFlags.Public | BindingFlags.Static)))
            .Where(t => t.Field is { IsLiteral: true })
            .ToDictionary(t => (string)t.Field!.GetRawConstantValue()!, t => t.Type);
        var configuration = new ConfigurationBuilder().AddInMemoryCollection(environment.Select(e => KeyValuePair.Create(e.Key.Replace("__", ":", StringComparison.Ordinal), (string?)e.Value))).Build();
        foreach (var section in environment.Keys.Where(k => k.Contains("__", StringComparison.Ordinal)).Select(k => k.Split("__")[0]).Distinct())
        {
            if (section is "Kestrel" or "Logging")
            {
                continue;
            }
            if (!sections.TryGetValue(section, out var type))
            {
                Assert.True(Pending.TryGetValue(service, out var pending) && pending.Contains(section),
                    $"{service}: keys of section '{section}' bind to no options class (known: {string.Join(", ", sections.Keys)})");
                TestContext.Current.SendDiagnosticMessage($"{service}: section '{section}' not checked: no options class yet");
                continue;
            }
            var options = configuration.GetSection(section).Get(type, o => o.ErrorOnUnknownConfiguration = true) ?? Activator.CreateInstance(type)!;
            var validator = assembly.GetTypes().SingleOrDefault(t => !t.IsAbstract && t.GetInterfaces().Contains(typeof(IValidateOptions<>).MakeGenericType(type)));
            if (validator is not null)
            {
                var result = (ValidateOptionsResult)validator.GetMethod("Validate")!.Invoke(Activator.CreateInstance(validator), [Options.DefaultName, options])!;
                Assert.False(result.Failed, $"{service}: {section} fails validation: {result.FailureMessage}");
            }
        }
        foreach (var key in environment.Keys.Where(k => !k.Contains("__", StringComparison.Ordinal)))
        {
            Assert.True(key is "POD_IP" or "POD_NAME" || key.StartsWith("ASPNETCORE_", StringComparison.Ordinal) || key.StartsWith("DOTNET_", StringComparison.Ordinal),
                $"{service}: '{key}' is not a configuration key of the service");
        }
    }

    [Theory]
    [MemberData(nameof(Services))]
    public void Endpoints_ports_and_probes_match_what_the_service_serves(string service)
    {
        var environment = Environment(service);
        var container = Container(service);
        var ports = ((YamlSequenceNode)container["ports"]).Cast<YamlMappingNode>().ToDictionary(p => p["name"].ToString(), p => int.Parse(p["containerPort"].ToString(), System.Globalization.CultureInfo.InvariantCulture));
        var endpoints = environment.Keys.Where(k => k.StartsWith("Kestrel__Endpoints__", StringComparison.Ordinal) && k.EndsWith("__Url", StringComparison.Ordinal))
            .ToDictionary(k => new Uri(environment[k].Replace("0.0.0.0", "localhost", StringComparison.Ordinal)).Port, k => environment[k[..^"Url".Length] + "Protocols"]);
        Assert.Equal(ports.Values.Order(), endpoints.Keys.Order());

        var routes = service == "controller" ? null : Routes(service, environment);
        foreach (var probe in new[] { "startupProbe", "readinessProbe", "livenessProbe" }.Where(p => container.Children.ContainsKey(p)))
        {
            var spec = (YamlMappingNode)container[probe];
            var target = spec.Children.TryGetValue("httpGet", out var http) ? (YamlMappingNode)http : (YamlMappingNode)spec["tcpSocket"];
            var port = target["port"].ToString();
            var number = ports.TryGetValue(port, out var named) ? named : int.Parse(port, System.Globalization.CultureInfo.InvariantCulture);
            Assert.True(endpoints.ContainsKey(number), $"{service} {probe}: port {port} is no Kestrel endpoint");
            if (target.Children.TryGetValue("path", out var path))
            {
                Assert.Contains("Http1", endpoints[number], StringComparison.Ordinal);
                if (routes is not null)
                {
                    Assert.True(routes.Contains(path.ToString()), $"{service} {probe}: {path} is not mapped (routes: {string.Join(", ", routes)})");
                }
            }
        }

        // A Prometheus scrape annotation points at an HTTP/1 endpoint that maps /metrics.
        var template = (YamlMappingNode)_documents.Single(d => Kind(d) == "Deployment" && Name(d) == service)["spec"]["template"]["metadata"];
        if (template.Children.TryGetValue("annotations", out var annotations) && ((YamlMappingNode)annotations).Children.TryGetValue("prometheus.io/port", out var scrape))
        {
            var number = int.Parse(scrape.ToString(), System.Globalization.CultureInfo.InvariantCulture);
            Assert.True(endpoints.TryGetValue(number, out var protocols) && protocols.Contains("Http1", StringComparison.Ordinal), $"{service}: scrape port {number} is no HTTP/1 endpoint");
            Assert.Equal("/metrics", ((YamlMappingNode)annotations)["prometheus.io/path"].ToString());
            if (routes is not null)
            {
                Assert.Contains("/metrics", routes);
            }
        }

        // Services target named ports that the pods declare.
        foreach (var svc in _documents.Where(d => Kind(d) == "Service" && ((YamlMappingNode)d["spec"]["selector"])["app.kubernetes.io/name"].ToString() == service))
        {
            foreach (YamlMappingNode port in (YamlSequenceNode)svc["spec"]["ports"])
            {
                Assert.True(ports.ContainsKey(port["targetPort"].ToString()), $"Service {Name(svc)} targets unknown port {port["targetPort"]}");
            }
        }
    }

    /// <summary>The route patterns the real service maps, built (not started) with the manifest's configuration.</summary>
    private static HashSet<string> Routes(string service, Dictionary<string, string> environment)
    {
        var builder = WebApplication.CreateBuilder(new WebApplicationOptions { EnvironmentName = "Production", ContentRootPath = AppContext.BaseDirectory });
        builder.Logging.ClearProviders();
        builder.Configuration.AddInMemoryCollection(environment.Select(e => KeyValuePair.Create(e.Key.Replace("__", ":", StringComparison.Ordinal), (string?)e.Value)));
        if (service == "gateway")
        {
            builder.AddGateway();
        }
        else
        {
            builder.AddModelService();
        }
        var app = builder.Build();
        if (service == "gateway")
        {
            app.MapGateway();
        }
        else
        {
            app.MapModelService();
        }
        return [.. ((IEndpointRouteBuilder)app).DataSources.SelectMany(d => d.Endpoints).OfType<RouteEndpoint>().Select(e => e.RoutePattern.RawText ?? "")];
    }

    /// <summary>What a service's container sees: env literals, then its ConfigMaps and Secrets.</summary>
    private Dictionary<string, string> Environment(string service)
    {
        var container = Container(service);
        var environment = new Dictionary<string, string>(StringComparer.Ordinal);
        if (container.Children.TryGetValue("env", out var env))
        {
            foreach (YamlMappingNode variable in (YamlSequenceNode)env)
            {
                environment[variable["name"].ToString()] = variable.Children.TryGetValue("value", out var value) ? value.ToString() : "from-field";
            }
        }
        if (container.Children.TryGetValue("envFrom", out var from))
        {
            foreach (YamlMappingNode source in (YamlSequenceNode)from)
            {
                var (kind, field, reference) = source.Children.ContainsKey("configMapRef") ? ("ConfigMap", "data", source["configMapRef"]) : ("Secret", "stringData", source["secretRef"]);
                var document = _documents.SingleOrDefault(d => Kind(d) == kind && Name(d) == reference["name"].ToString());
                Assert.True(document is not null, $"{service}: {kind} {reference["name"]} is not in deploy/k8s");
                foreach (var (key, value) in (YamlMappingNode)document![field])
                {
                    environment[key.ToString()] = value.ToString();
                }
            }
        }
        return environment;
    }

    private YamlMappingNode Container(string deployment)
    {
        var document = _documents.Single(d => Kind(d) == "Deployment" && Name(d) == deployment);
        return (YamlMappingNode)((YamlSequenceNode)document["spec"]["template"]["spec"]["containers"]).Single();
    }

    private static string Scalar(YamlMappingNode node, params string[] path) =>
        path.Aggregate((YamlNode)node, (n, key) => ((YamlMappingNode)n)[key]).ToString();

    private static string Kind(YamlMappingNode document) => document["kind"].ToString();

    private static string Name(YamlMappingNode document) => document["metadata"]["name"].ToString();

    private static IEnumerable<YamlMappingNode> Load(string file)
    {
        var stream = new YamlStream();
        using var reader = new StreamReader(file);
        stream.Load(reader);
        return stream.Documents.Select(d => d.RootNode).OfType<YamlMappingNode>();
    }
}

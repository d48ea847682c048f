using System.Net.Http.Json;
using System.Text.Json;
using DslaMesh.Protos.V1;
using DslaMesh.Tests.Common;

namespace DslaMesh.ModelService.Tests;

/// <summary>The model the service embeds: loads with its distilled layers, converts live and answers.</summary>
public sealed class DefaultModelTests
{
    [Fact]
    public async Task Embedded_default_model_serves_and_converts_its_distilled_layers()
    {
        var ct = TestContext.Current.CancellationToken;
        var embedded = Path.Combine(AppContext.BaseDirectory, "models", "default");
        Assert.True(File.Exists(Path.Combine(embedded, "dsla", "manifest.json")), $"the default model with its DSLA layers should be copied to {embedded}");
        await using var service = await ModelServiceHost.StartAsync(embedded, null);
        Assert.Equal("dsla-foldable", service.Model.Model!.Variant);
        Assert.Equal(8, service.Model.Model.LayerCount);

        using var control = service.Control.Control(cancellationToken: ct);
        var command = new ConversionCommand { Epoch = 1, Issuer = "test" };
        var order = service.Model.Model.ConversionOrder;
        command.Layers.Add(order.Take(4).Select(l => new LayerTarget { Layer = l, Kind = LayerKind.Dsla }));
        await control.RequestStream.WriteAsync(command, ct);
        Assert.True(await control.ResponseStream.MoveNext(ct));
        Assert.True(control.ResponseStream.Current.Accepted, control.ResponseStream.Current.Reason);
        await control.RequestStream.CompleteAsync();

        var response = await service.Http.PostAsJsonAsync("/v1/completions", new { prompt = "The jury said", max_tokens = 12, temperature = 0 }, ct);
        response.EnsureSuccessStatusCode();
        using var json = JsonDocument.Parse(await response.Content.ReadAsStringAsync(ct));
        Assert.False(string.IsNullOrWhiteSpace(json.RootElement.GetProperty("choices")[0].GetProperty("text").GetString()));
        var decodeLayers = json.RootElement.GetProperty("dsla").GetProperty("decode_dsla_layers").EnumerateArray().Select(e => e.GetInt32()).Order().ToArray();
        Assert.Equal(order.Take(4).Order().ToArray(), decodeLayers);
    }

    [Fact]
    public void Embedded_default_model_fits_32_MiB_and_every_shipped_variant_loads()
    {
        var embedded = Path.Combine(AppContext.BaseDirectory, "models", "default");
        var bytes = Directory.GetFiles(embedded, "*", SearchOption.AllDirectories).Sum(f => new FileInfo(f).Length);
        Assert.True(bytes <= 32L * 1024 * 1024, $"the default model takes {bytes / 1048576.0:F1} MiB; the limit is 32 MiB");
        var manifest = DslaMesh.Engine.Dsla.DslaManifest.TryLoad(embedded)!;
        Assert.Equal(["dsla", "dsla-foldable", "gla"], manifest.Variants.Keys.Order());
        using var model = DslaMesh.Engine.Models.LoadedModel.Load(embedded, new DslaMesh.Engine.Backends.TorchBackendOptions { Device = "cpu" });
        foreach (var variant in manifest.Variants.Keys)
        {
            Assert.True(model.AttachDsla(variant), variant);
            Assert.Equal(8, model.Dsla!.Layers.Count);
        }
    }
}

var builder = WebApplication.CreateBuilder(args);
builder.AddGateway();

var app = builder.Build();
app.MapGateway();
app.Run();

/// <summary>The gateway host (public for functional tests).</summary>
public partial class Program;

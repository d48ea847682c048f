var builder = WebApplication.CreateBuilder(args);
builder.AddController();

var app = builder.Build();
app.MapController();
app.Run();

/// <summary>The controller host (public for functional tests).</summary>
public partial class Program;

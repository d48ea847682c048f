var builder = WebApplication.CreateBuilder(args);
builder.AddModelService();

var app = builder.Build();
app.MapModelService();
app.Run();

/// <summary>The model service host (public for functional tests).</summary>
public partial class Program;

# The controller: reads fleet metrics from Redis, streams layer-conversion commands to the model services.
# Build from the repository root:  docker build -f deploy/docker/controller.Dockerfile -t dslamesh/controller .
FROM mcr.microsoft.com/dotnet/sdk:10.0 AS build
WORKDIR /src
COPY . .
RUN dotnet publish services/DslaMesh.Controller/DslaMesh.Controller.csproj -c Release -o /app --nologo

FROM mcr.microsoft.com/dotnet/aspnet:10.0
WORKDIR /app
COPY --from=build /app .
ENV ASPNETCORE_ENVIRONMENT=Production \
    Kestrel__Endpoints__Http__Url=http://0.0.0.0:5200 \
    Kestrel__Endpoints__Http__Protocols=Http1 \
    Kestrel__Endpoints__Grpc__Url=http://0.0.0.0:5201 \
    Kestrel__Endpoints__Grpc__Protocols=Http2
EXPOSE 5200 5201
USER app
ENTRYPOINT ["dotnet", "DslaMesh.Controller.dll"]

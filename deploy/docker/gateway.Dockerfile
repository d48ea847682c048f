# The gateway: YARP on ASP.NET Core, no native dependencies.
# Build from the repository root:  docker build -f deploy/docker/gateway.Dockerfile -t dslamesh/gateway .
FROM mcr.microsoft.com/dotnet/sdk:10.0 AS build
WORKDIR /src
COPY . .
RUN dotnet publish services/DslaMesh.Gateway/DslaMesh.Gateway.csproj -c Release -o /app --nologo

FROM mcr.microsoft.com/dotnet/aspnet:10.0
WORKDIR /app
COPY --from=build /app .
ENV ASPNETCORE_ENVIRONMENT=Production \
    Kestrel__Endpoints__Http__Url=http://0.0.0.0:8080 \
    Kestrel__Endpoints__Http__Protocols=Http1 \
    Kestrel__Endpoints__Grpc__Url=http://0.0.0.0:8081 \
    Kestrel__Endpoints__Grpc__Protocols=Http2
EXPOSE 8080 8081
USER app
ENTRYPOINT ["dotnet", "DslaMesh.Gateway.dll"]

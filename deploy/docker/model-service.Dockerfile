# The GPU model service. NuGet serves no CUDA LibTorch for Linux, so the image carries PyTorch (CUDA) from pip and the
# service is built with DslaTorchBackend=external: it ships only TorchSharp's bridge and loads PyTorch's
# libtorch_cuda.so at start (TorchRuntime asks python3 where torch lives, or set ModelService__Backend__LibTorchDirectory).
# Build from the repository root:  docker build -f deploy/docker/model-service.Dockerfile -t dslamesh/model-service .
# Model weights are not baked in: mount a model folder at /models/default (see deploy/k8s/model-service.yaml).
FROM mcr.microsoft.com/dotnet/sdk:10.0 AS build
WORKDIR /src
COPY . .
RUN dotnet publish services/DslaMesh.ModelService/DslaMesh.ModelService.csproj -c Release -o /app --nologo -p:DslaTorchBackend=external

FROM mcr.microsoft.com/dotnet/aspnet:10.0 AS dotnet

FROM nvidia/cuda:13.0.0-runtime-ubuntu24.04
ARG TORCH_VERSION=2.11.0
RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-pip ca-certificates libicu74 \
    && pip3 install --no-cache-dir --break-system-packages "torch==${TORCH_VERSION}" \
    && rm -rf /var/lib/apt/lists/*
COPY --from=dotnet /usr/share/dotnet /usr/share/dotnet
RUN ln -s /usr/share/dotnet/dotnet /usr/bin/dotnet
WORKDIR /app
COPY --from=build /app .
ENV ASPNETCORE_ENVIRONMENT=Production \
    DOTNET_RUNNING_IN_CONTAINER=true \
    Kestrel__Endpoints__Http__Url=http://0.0.0.0:5100 \
    Kestrel__Endpoints__Http__Protocols=Http1 \
    Kestrel__Endpoints__Grpc__Url=http://0.0.0.0:5101 \
    Kestrel__Endpoints__Grpc__Protocols=Http2 \
    ModelService__ModelPath=/models/default \
    ModelService__Backend__Device=cuda
EXPOSE 5100 5101
ENTRYPOINT ["dotnet", "DslaMesh.ModelService.dll"]

#!/usr/bin/env bash
# The one-command local mesh: Redis, two model services, the controller and the gateway on 127.0.0.1.
#
#   deploy/local/run.sh            build (Release), start everything, stream a demo answer, keep running until Ctrl-C
#   deploy/local/run.sh --once     the same, then stop (smoke test)
#
# Ports (fixed; override with the environment variables):
#   DSLAMESH_REDIS_PORT        6390   redis-server
#   DSLAMESH_MS1_PORT          5110   model service 1, HTTP (OpenAI API, /health, /metrics); gRPC on +1 (5111)
#   DSLAMESH_MS2_PORT          5120   model service 2, HTTP; gRPC on +1 (5121)
#   DSLAMESH_CONTROLLER_PORT   5200   controller, HTTP; gRPC on +1 (5201)
#   DSLAMESH_GATEWAY_PORT      8080   gateway, HTTP/1.1 (OpenAI API); gRPC (h2c) on +1 (8081)
# Other settings:
#   DSLAMESH_MODEL    model folder served by both model services (default: the embedded default model,
#                     models/brown-8l, with its distilled DSLA layers)
#   DSLAMESH_API_KEY  the gateway's API key (default: local-dev-key-0123456789)
# Logs go to deploy/local/.logs/.
set -euo pipefail
cd "$(dirname "$0")/../.."
root="$(pwd)"

once=0
for arg in "$@"; do
  case "$arg" in
    --once) once=1 ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "unknown argument: $arg (try --help)" >&2; exit 2 ;;
  esac
done

model="${DSLAMESH_MODEL:-$root/models/brown-8l}"
api_key="${DSLAMESH_API_KEY:-local-dev-key-0123456789}"
redis_port="${DSLAMESH_REDIS_PORT:-6390}"
ms1_port="${DSLAMESH_MS1_PORT:-5110}"
ms2_port="${DSLAMESH_MS2_PORT:-5120}"
controller_port="${DSLAMESH_CONTROLLER_PORT:-5200}"
gateway_port="${DSLAMESH_GATEWAY_PORT:-8080}"
logs="$root/deploy/local/.logs"
export DOTNET_CLI_TELEMETRY_OPTOUT=1 DOTNET_NOLOGO=1

say() { printf '\033[1m[mesh]\033[0m %s\n' "$*"; }
die() { printf '\033[31m[mesh] %s\033[0m\n' "$*" >&2; exit 1; }

[ -f "$model/config.json" ] || die "no model at $model (set DSLAMESH_MODEL to a model folder)"
command -v dotnet >/dev/null || die "the .NET 10 SDK is required (dotnet not on PATH)"
if ! command -v redis-server >/dev/null || ! command -v curl >/dev/null || ! command -v python3 >/dev/null; then
  say "installing prerequisites (redis-server, curl, python3)"
  command -v curl >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq curl >/dev/null; }
  bash deploy/scripts/install-prerequisites.sh
fi
for port in "$redis_port" "$ms1_port" $((ms1_port + 1)) "$ms2_port" $((ms2_port + 1)) "$controller_port" $((controller_port + 1)) "$gateway_port" $((gateway_port + 1)); do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    die "port $port is in use; stop what listens there or override the port (see --help)"
  fi
done

say "building (Release)"
for project in DslaMesh.ModelService DslaMesh.Controller DslaMesh.Gateway DslaMesh.Cli; do
  dotnet build "services/$project/$project.csproj" -c Release -v q -nologo >/dev/null || {
    dotnet build "services/$project/$project.csproj" -c Release -v q -nologo | tail -30; die "build of $project failed"; }
done
bin() { echo "$root/services/$1/bin/Release/net10.0/$2"; }

mkdir -p "$logs"
pids=()
names=()
stopping=0
cleanup() {
  [ "$stopping" -eq 1 ] && return
  stopping=1
  say "stopping (draining model services)"
  # Reverse order: gateway first, Redis last, so the services can deregister.
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
    kill -TERM "${pids[$i]}" 2>/dev/null || true
    # Let each one finish its own shutdown before the next (bounded).
    for _ in $(seq 1 100); do kill -0 "${pids[$i]}" 2>/dev/null || break; sleep 0.2; done
    kill -KILL "${pids[$i]}" 2>/dev/null || true
    wait "${pids[$i]}" 2>/dev/null || true
  done
  say "stopped"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

start() {   # start NAME COMMAND... ; environment comes from the caller
  local name="$1"; shift
  "$@" >"$logs/$name.log" 2>&1 &
  pids+=($!)
  names+=("$name")
  say "started $name (pid $!, log deploy/local/.logs/$name.log)"
}

wait_http() {   # wait_http NAME URL [SECONDS]
  local name="$1" url="$2" seconds="${3:-120}"
  for _ in $(seq 1 $((seconds * 5))); do
    if curl -fsS -o /dev/null "$url" 2>/dev/null; then return 0; fi
    for i in "${!pids[@]}"; do
      kill -0 "${pids[$i]}" 2>/dev/null || { tail -20 "$logs/${names[$i]}.log" >&2; die "${names[$i]} exited"; }
    done
    sleep 0.2
  done
  tail -20 "$logs/$name.log" >&2
  die "$name not ready at $url after ${seconds}s"
}

start redis redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no --protected-mode no
redis="127.0.0.1:$redis_port"
admin_token="${DSLAMESH_ADMIN_TOKEN:-local-admin-token}"
for i in 1 2; do
  port_var="ms${i}_port"; port="${!port_var}"
  Kestrel__Endpoints__Http__Url="http://127.0.0.1:$port" Kestrel__Endpoints__Http__Protocols=Http1 \
  Kestrel__Endpoints__Grpc__Url="http://127.0.0.1:$((port + 1))" Kestrel__Endpoints__Grpc__Protocols=Http2 \
  ModelService__ModelPath="$model" ModelService__ServiceId="local-$i" ModelService__Backend__CpuThreads=1 \
  Redis__Configuration="$redis" \
    start "model-service-$i" dotnet "$(bin DslaMesh.ModelService DslaMesh.ModelService.dll)"
done
Kestrel__Endpoints__Http__Url="http://127.0.0.1:$controller_port" Kestrel__Endpoints__Http__Protocols=Http1 \
Kestrel__Endpoints__Grpc__Url="http://127.0.0.1:$((controller_port + 1))" Kestrel__Endpoints__Grpc__Protocols=Http2 \
Redis__Configuration="$redis" DSLAMESH_ADMIN_TOKEN="$admin_token" \
  start controller dotnet "$(bin DslaMesh.Controller DslaMesh.Controller.dll)"
Kestrel__Endpoints__Http__Url="http://127.0.0.1:$gateway_port" Kestrel__Endpoints__Http__Protocols=Http1 \
Kestrel__Endpoints__Grpc__Url="http://127.0.0.1:$((gateway_port + 1))" Kestrel__Endpoints__Grpc__Protocols=Http2 \
Redis__Configuration="$redis" Gateway__ApiKeys__0__Name=local Gateway__ApiKeys__0__Key="$api_key" \
  start gateway dotnet "$(bin DslaMesh.Gateway DslaMesh.Gateway.dll)"

wait_http model-service-1 "http://127.0.0.1:$ms1_port/health"
wait_http model-service-2 "http://127.0.0.1:$ms2_port/health"
wait_http controller "http://127.0.0.1:$controller_port/health"
wait_http gateway "http://127.0.0.1:$gateway_port/health"
# Ready means both replicas are routable through the gateway.
for _ in $(seq 1 100); do
  replicas="$(curl -fsS -H "Authorization: Bearer $api_key" "http://127.0.0.1:$gateway_port/v1/models" 2>/dev/null \
    | python3 -c 'import json,sys; print(sum(m.get("replicas",0) for m in json.load(sys.stdin)["data"]))' 2>/dev/null || echo 0)"
  [ "$replicas" = "2" ] && break
  sleep 0.2
done
[ "$replicas" = "2" ] || die "the gateway sees $replicas replica(s), expected 2"
say "mesh ready: gateway http://127.0.0.1:$gateway_port (OpenAI), h2c 127.0.0.1:$((gateway_port + 1)) (gRPC); 2 replicas"

say "streaming a completion through the gateway:"
curl -fsS -N "http://127.0.0.1:$gateway_port/v1/completions" -H "Authorization: Bearer $api_key" -H 'Content-Type: application/json' \
  -d '{"prompt":"The quick brown fox","max_tokens":32,"temperature":0.8,"seed":1,"stream":true}' -D "$logs/demo-headers.txt" \
  | python3 -u -c '
import json, sys
receipt = None
for line in sys.stdin:
    line = line.strip()
    if not line.startswith("data: "):
        continue
    data = line[6:]
    if data == "[DONE]":
        break
    chunk = json.loads(data)
    if "error" in chunk:
        print("\nerror:", chunk["error"]["message"]); sys.exit(1)
    sys.stdout.write(chunk["choices"][0]["text"]); sys.stdout.flush()
    receipt = chunk.get("dsla") or receipt
print()
if receipt:
    print("receipt: dsla layers (decode) %s of %d, kv saved %d bytes" % (receipt["decode_dsla_layers"], receipt["layer_count"], receipt["kv_bytes_saved"]))
'
say "served by replica: $(grep -i '^x-dslamesh-replica' "$logs/demo-headers.txt" | tr -d '\r' | cut -d' ' -f2)"

dslactl=(dotnet "$(bin DslaMesh.Cli dslactl.dll)")
say "dslactl status:"
sleep 1   # one controller tick, so the table shows the services' first metrics
"${dslactl[@]}" status --controller "http://127.0.0.1:$((controller_port + 1))" --token "$admin_token" || say "(dslactl status failed; see above)"

if [ "$once" -eq 1 ]; then
  exit 0
fi
say "running; press Ctrl-C to stop everything"
say "try: curl -N http://127.0.0.1:$gateway_port/v1/chat/completions -H 'Authorization: Bearer $api_key' -H 'Content-Type: application/json' -d '{\"messages\":[{\"role\":\"user\",\"content\":\"Hi\"}],\"stream\":true}'"
while true; do
  for i in "${!pids[@]}"; do
    kill -0 "${pids[$i]}" 2>/dev/null || die "${names[$i]} exited unexpectedly; see deploy/local/.logs/${names[$i]}.log"
  done
  sleep 1
done

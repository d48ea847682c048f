#!/usr/bin/env bash
# The trace-replay benchmark on the one-command local mesh (CPU, the embedded default model):
#
#   deploy/local/bench-replay.sh [dslactl bench replay options...]
#
# Brings the mesh up with deploy/local/run.sh (Redis, two model services, the controller, the gateway), runs
# `dslactl bench replay` against it (static all-attention, adaptive, static 25% and 50% DSLA by default), writes
# docs/benchmarks/replay-cpu.{json,png} unless --json/--png are given, and stops the mesh.
#
# The model services get a KV-cache budget, so the all-attention baseline is memory-bound the way a GPU replica is
# (set DSLAMESH_KV_BUDGET_MIB=0 for none), and do not convert layers on their own under KV pressure, so the static
# modes stay static and only the controller adapts (DSLAMESH_CONVERT_UNDER_PRESSURE=true to allow it).
#   DSLAMESH_KV_BUDGET_MIB            16    per model service (brown-8l holds 8 KiB of fp32 KV per token)
#   DSLAMESH_CONVERT_UNDER_PRESSURE   false
# Every port and setting of run.sh applies (see deploy/local/run.sh --help).
set -euo pipefail
cd "$(dirname "$0")/../.."
root="$(pwd)"
budget_mib="${DSLAMESH_KV_BUDGET_MIB:-16}"
export ModelService__Engine__KvBudgetBytes=$((budget_mib * 1024 * 1024))
export ModelService__Engine__ConvertUnderPressure="${DSLAMESH_CONVERT_UNDER_PRESSURE:-false}"
export DSLAMESH_ADMIN_TOKEN="${DSLAMESH_ADMIN_TOKEN:-local-admin-token}"
export DSLAMESH_API_KEY="${DSLAMESH_API_KEY:-local-dev-key-0123456789}"
model="${DSLAMESH_MODEL:-$root/models/brown-8l}"
controller_port="${DSLAMESH_CONTROLLER_PORT:-5200}"
gateway_port="${DSLAMESH_GATEWAY_PORT:-8080}"
log="$root/deploy/local/.logs/mesh.log"
mkdir -p "$(dirname "$log")"

bash deploy/local/run.sh >"$log" 2>&1 &
mesh=$!
stop() { kill -TERM "$mesh" 2>/dev/null || true; wait "$mesh" 2>/dev/null || true; }
trap stop EXIT
for _ in $(seq 1 600); do
  grep -q "running; press Ctrl-C" "$log" 2>/dev/null && break
  kill -0 "$mesh" 2>/dev/null || { tail -30 "$log" >&2; echo "the mesh did not start (log: $log)" >&2; exit 1; }
  sleep 0.5
done
grep -q "running; press Ctrl-C" "$log" || { tail -30 "$log" >&2; echo "the mesh was not ready after 300 s" >&2; exit 1; }
echo "[bench] mesh up (KV budget ${budget_mib} MiB per service, convert under pressure: $ModelService__Engine__ConvertUnderPressure)"

# Defaults for any of these options the caller does not give.
defaults=()
for pair in "--requests 240" "--rate 10" "--length-scale 0.125" "--output-tokens 64" \
            "--json docs/benchmarks/replay-cpu.json" "--png docs/benchmarks/replay-cpu.png"; do
  [[ " $* " == *" ${pair%% *} "* ]] || defaults+=($pair)
done
dotnet "$root/services/DslaMesh.Cli/bin/Release/net10.0/dslactl.dll" bench replay \
  --controller "http://127.0.0.1:$((controller_port + 1))" --gateway "http://127.0.0.1:$((gateway_port + 1))" \
  --model "$model" "${defaults[@]}" "$@"

#!/usr/bin/env bash
# Gateway overhead with the gateway and the stub replica as processes of their own, each on its own CPUs (issue #7),
# on a Linux host that has no .NET SDK.
#
# usage: deploy/bench/gateway-overhead-processes.sh bundle [OUT_DIR]
#          on a machine with the .NET 10 SDK, from anywhere in the repository: publishes bench/DslaMesh.Gateway.Bench
#          (Release, framework-dependent) with the .NET runtime it needs into OUT_DIR/dslamesh-gwbench.tar.xz
#          (default OUT_DIR: <repo>/.device), through deploy/gpu/build-bundle.sh
#        deploy/bench/gateway-overhead-processes.sh run BUNDLE_DIR RESULTS_DIR [BENCH_OPTION ...]
#          on the benchmark host (Linux, at least 4 cores; redis-server used when on PATH), after
#          `tar -xJf dslamesh-gwbench.tar.xz -C /tmp` (BUNDLE_DIR = /tmp/dslamesh-gwbench). Five runs, each writing
#          RESULTS_DIR/NAME.json and NAME.log:
#            inprocess          client, gateway and replica in one process on all cores (the default mode, for reference)
#            processes          --processes, client CPUs 0-3, gateway 4-11, replica 12-15 on 16 CPUs 0-15
#                               (in general: first quarter / middle half / last quarter of the CPUs allowed)
#            processes-paced20  the same split, one token every 20 ms (per-token delivery as a model paces it)
#            processes-h2-100   the same split, the gateway allowing 100 HTTP/2 streams per client connection instead
#                               of 1000 (an experiment: gRPC clients then spread 256 streams over several connections)
#            processes-gw-quarter  second split: client 0-7, gateway 8-11, replica 12-15 (half / quarter / quarter)
#          CLIENT_CPUS, GATEWAY_CPUS, REPLICA_CPUS override the first split (all three: also below 4 cores, where
#          the second split is skipped). BENCH_OPTIONs go to every run
#          (e.g. --concurrency 1,16 --seconds 1 for a quick check). About 6–7 minutes with the defaults.
set -uo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
usage() { sed -n '5,22p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

case "${1:-}" in
  bundle)
    exec "$root/deploy/gpu/build-bundle.sh" -o "${2:-$root/.device}" -n dslamesh-gwbench bench/DslaMesh.Gateway.Bench
    ;;
  run)
    [ $# -ge 3 ] || { usage >&2; exit 2; }
    bundle="$(cd "$2" && pwd)" || exit 2
    results="$3"
    shift 3
    ;;
  -h|--help) usage; exit 0 ;;
  *) usage >&2; exit 2 ;;
esac

bench="$bundle/bin/DslaMesh.Gateway.Bench"
[ -x "$bench" ] || { echo "error: no $bench (unpack dslamesh-gwbench.tar.xz and pass its folder)" >&2; exit 1; }
mkdir -p "$results" && results="$(cd "$results" && pwd)"

# The CPUs this script may use (a container's cpuset need not start at 0), split by position in that list.
allowed="$(awk '/^Cpus_allowed_list/ {print $2}' /proc/self/status)"
cpus=()
IFS=, read -ra parts <<< "$allowed"
for part in "${parts[@]}"; do
  if [[ $part == *-* ]]; then
    for ((c = ${part%-*}; c <= ${part#*-}; c++)); do cpus+=("$c"); done
  else
    cpus+=("$part")
  fi
done
cores=${#cpus[@]}
q=$((cores / 4))
cpu_list() {   # cpu_list FIRST LAST: the allowed CPUs at those positions (inclusive), comma-separated
  local out=() i
  for ((i = $1; i <= $2; i++)); do out+=("${cpus[$i]}"); done
  (IFS=,; echo "${out[*]}")
}
if [ -n "${CLIENT_CPUS:-}" ] && [ -n "${GATEWAY_CPUS:-}" ] && [ -n "${REPLICA_CPUS:-}" ]; then
  client="$CLIENT_CPUS" gateway="$GATEWAY_CPUS" replica="$REPLICA_CPUS"
elif [ "$q" -ge 1 ]; then
  client="${CLIENT_CPUS:-$(cpu_list 0 $((q - 1)))}"
  gateway="${GATEWAY_CPUS:-$(cpu_list "$q" $((3 * q - 1)))}"
  replica="${REPLICA_CPUS:-$(cpu_list $((3 * q)) $((cores - 1)))}"
else
  echo "error: $cores CPUs ($allowed); the CPU splits need at least 4 (or set CLIENT_CPUS, GATEWAY_CPUS and REPLICA_CPUS)" >&2
  exit 1
fi

failed=0
bench_run() {   # bench_run NAME OPTION...
  local name="$1"; shift
  echo "== $name: $* ${extra[*]}" >&2
  echo "   load before: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
  if "$bench" "$@" "${extra[@]}" --out "$results/$name.json" > "$results/$name.log" 2>&1; then
    grep -E '^(Gateway overhead|max req/s)' "$results/$name.log" | sort -u >&2
  else
    echo "   FAILED (exit $?), last lines of $results/$name.log:" >&2
    tail -15 "$results/$name.log" >&2
    failed=1
  fi
  echo "   load after: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
}

extra=("$@")
# Which CPUs are hyperthread siblings (a split should not put two roles on one core's two threads).
{ lscpu -e 2>/dev/null || cat /proc/cpuinfo; } > "$results/cpus.txt"
echo "host: $cores CPUs allowed ($allowed) of $(nproc --all 2>/dev/null || echo '?') online, $(uname -r), redis-server: $(command -v redis-server || echo 'none (static registry)'), bundle $(cat "$bundle/VERSION" 2>/dev/null)" >&2
bench_run inprocess
bench_run processes --processes --client-cpus "$client" --gateway-cpus "$gateway" --replica-cpus "$replica"
bench_run processes-paced20 --processes --client-cpus "$client" --gateway-cpus "$gateway" --replica-cpus "$replica" --token-interval-ms 20
bench_run processes-h2-100 --processes --client-cpus "$client" --gateway-cpus "$gateway" --replica-cpus "$replica" --gateway-h2-streams 100
if [ "$q" -ge 1 ]; then
  bench_run processes-gw-quarter --processes --client-cpus "$(cpu_list 0 $((2 * q - 1)))" --gateway-cpus "$(cpu_list $((2 * q)) $((3 * q - 1)))" \
    --replica-cpus "$(cpu_list $((3 * q)) $((cores - 1)))"
else
  echo "== processes-gw-quarter: skipped (fewer than 4 cores)" >&2
fi
echo "results: $results" >&2
exit "$failed"

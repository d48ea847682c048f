#!/usr/bin/env bash
# Runs on a GPU host from an unpacked bundle: CUDA correctness on a tiny checkpoint, then the engine benchmark and the
# transformers baseline, then the side-by-side table. Everything lands in OUT_DIR (logs, JSON, table.md).
#
# usage: verify-and-bench.sh OUT_DIR [FIXTURE_DIR] [-- extra `dslactl bench engine` arguments]
#   FIXTURE_DIR  a tiny HF Llama folder with greedy.json and reference.safetensors
#                (default: tests/fixtures/llama/llama-gqa-untied of a DslaMesh checkout in the current folder)
# Environment: SKIP_BASELINE=1 skips transformers; VERIFY_ONLY=1 stops after the correctness checks (and
# `dslactl kernels check`); BENCH_TIMEOUT / BASELINE_TIMEOUT (seconds) bound each stage.
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:?usage: verify-and-bench.sh OUT_DIR [FIXTURE_DIR] [-- bench args]}"
shift
fixture="tests/fixtures/llama/llama-gqa-untied"
if [ $# -gt 0 ] && [ "$1" != "--" ]; then fixture="$1"; shift; fi
[ "${1:-}" = "--" ] && shift
bench_args=("$@")
mkdir -p "$out"
log="$out/log.txt"
exec > >(tee -a "$log") 2>&1
export PYTHONUNBUFFERED=1

echo "== host"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader | tee "$out/card.txt"
python3 -c 'import sys, torch, transformers; print(sys.executable, "torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__)'
grep -E '^(PRETTY_NAME)=' /etc/os-release || true
strings "$(python3 -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))')" 2>/dev/null | grep -c '^GLIBCXX_3.4.32$' >/dev/null && echo "host libstdc++ has GLIBCXX_3.4.32" || true
ldd "$here/app/dslactl/libLibTorchSharp.so" | grep -i 'not found' || echo "libLibTorchSharp.so: every needed library resolves by soname once LibTorch is loaded"
cat "$here/VERSION"

echo "== correctness: greedy tokens on $fixture (CPU fp32, CUDA fp32, CUDA bf16; CUDA also with the norms fused into the GEMVs) against transformers' greedy.json"
prompt="$(python3 -c 'import json, sys; print(",".join(map(str, json.load(open(sys.argv[1]))["prompt_ids"])))' "$fixture/greedy.json")"
count="$(python3 -c 'import json, sys; print(len(json.load(open(sys.argv[1]))["continuation"]))' "$fixture/greedy.json")"
for variant in "cpu float32" "cuda float32" "cuda bfloat16" "cuda float32 norm" "cuda bfloat16 norm"; do
  set -- $variant
  name="$1-$2${3:+-$3}"
  "$here/run.sh" generate --device "$1" --dtype "$2" -m "$fixture" --ids "$prompt" --greedy -n "$count" --logprobs \
    ${3:+--norm-into-projections} > "$out/generate-$name.out" 2> "$out/generate-$name.err"
  echo "generate $name: exit $? ids $(grep -o 'token [0-9]*' "$out/generate-$name.err" | awk '{print $2}' | paste -sd,)"
done
for variant in "cuda float32" "cuda bfloat16"; do
  set -- $variant
  ids="$(python3 -c 'import sys; from safetensors.torch import load_file; print(",".join(map(str, load_file(sys.argv[1])["input_ids"].tolist())))' "$fixture/reference.safetensors")"
  "$here/run.sh" model logits --device "$1" --dtype "$2" -m "$fixture" --ids "$ids" > "$out/logits-$1-$2.json" 2> "$out/logits-$1-$2.err"
  echo "logits $1 $2: exit $?"
done
python3 - "$fixture" "$out" <<'EOF' | tee "$out/correctness.txt"
import json, sys, re
import torch
from safetensors.torch import load_file
fixture, out = sys.argv[1], sys.argv[2]
expected = json.load(open(f"{fixture}/greedy.json"))["continuation"]
ok = True
for variant in ["cpu-float32", "cuda-float32", "cuda-bfloat16", "cuda-float32-norm", "cuda-bfloat16-norm"]:
    ids = [int(m) for m in re.findall(r"token (\d+)", open(f"{out}/generate-{variant}.err").read())]
    same = ids == expected
    ok &= same or variant.startswith("cuda-bfloat16")
    print(f"greedy {variant}: {'MATCH' if same else 'DIFFER'} ({sum(a == b for a, b in zip(ids, expected))}/{len(expected)} tokens)")
ref = load_file(f"{fixture}/reference.safetensors")["logits"].float()
for variant, bound in [("cuda-float32", 1e-4), ("cuda-bfloat16", None)]:
    try:
        logits = torch.tensor(json.load(open(f"{out}/logits-{variant}.json"))["logits"])
        delta = (logits - ref).abs().max().item()
        rel = ((logits - ref).norm() / ref.norm()).item()
        good = bound is None or delta <= bound
        ok &= good
        print(f"logits {variant}: max |Δ| {delta:.3e}, relative {rel:.3e}, argmax agreement {(logits.argmax(-1) == ref.argmax(-1)).float().mean().item():.3f}"
              + ("" if bound is None else f" ({'PASS' if good else 'FAIL'} ≤ {bound})"))
    except Exception as error:  # noqa: BLE001
        ok = False
        print(f"logits {variant}: FAILED ({error})")
print("correctness:", "PASS" if ok else "FAIL")
EOF

echo "== dslactl kernels check (the engine's CUDA kernels against their references)"
"$here/run.sh" kernels check --json "$out/kernels.json" > "$out/kernels.txt" 2>&1
echo "kernels check: exit $? ($(tail -1 "$out/kernels.txt"))"
[ "${VERIFY_ONLY:-0}" = 1 ] && exit 0
echo "== dslactl bench engine"
timeout "${BENCH_TIMEOUT:-300}" "$here/run.sh" bench engine --json "$out/engine.json" --compare-plain --compare-without-graphs "${bench_args[@]}" 2> "$out/engine.err" | tee "$out/engine.txt"
echo "bench exit ${PIPESTATUS[0]}"; cat "$out/engine.err"

if [ -z "${SKIP_BASELINE:-}" ]; then
  echo "== transformers baseline"
  timeout "${BASELINE_TIMEOUT:-400}" python3 "$here/bench_transformers.py" --out "$out" 2>&1 | tee "$out/transformers.txt"
  echo "baseline exit ${PIPESTATUS[0]}"
  echo "== transformers sdpa with PyTorch's cuDNN attention off (as the engine runs)"
  timeout "${BASELINE_TIMEOUT:-400}" python3 "$here/bench_transformers.py" --attention sdpa --no-cudnn-sdp --out "$out" 2>&1 | tee -a "$out/transformers.txt"
fi

echo "== table"
reports=("$out/engine.json")
for f in "$out/transformers-sdpa.json" "$out/transformers-sdpa-nocudnn.json" "$out/transformers-eager.json"; do [ -f "$f" ] && reports+=("$f"); done
[ -f "$out/engine.json" ] && python3 "$here/compare.py" "${reports[@]}" --markdown "$out/table.md"

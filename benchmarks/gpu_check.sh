#!/usr/bin/env bash
# GPU check: the shipped distillation recipe (kdet distill bccd_distill: the bundled teacher into
# the size-t student, teacher on every batch) for EPOCHS epochs on one GPU in fp32, bf16 and fp16,
# then with torchrun on every GPU of the machine (when it has two or more) in fp32 and bf16 with
# SyncBatchNorm. Prints a Markdown table: first epoch, median of the later epochs, test AP.
# The runs go one after another; run it on an otherwise idle machine.
#   benchmarks/gpu_check.sh [OUT_DIR] [EPOCHS]      (default runs/gpu_check, 5 epochs)
# Environment: KDET (default kdet), TORCHRUN (default torchrun), PYTHON (default python),
# WORKERS (loader processes per training process, default 4), DEVICE (default cuda; cpu with
# EXTRA="--set data.input_size=64" only to try the script itself), EXTRA (more --set options).
# train.batch_size stays the recipe's 16 images per step in every run, shared among the GPUs
# under torchrun (rounded down to a multiple of their number).
set -euo pipefail
OUT=${1:-runs/gpu_check}
EPOCHS=${2:-5}
KDET=${KDET:-kdet}
TORCHRUN=${TORCHRUN:-torchrun}
PYTHON=${PYTHON:-python}
WORKERS=${WORKERS:-4}
DEVICE=${DEVICE:-cuda}
EXTRA=${EXTRA:-}
if [ "$DEVICE" = cuda ]; then
  GPUS=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())")
  if [ "$GPUS" -lt 1 ]; then echo "no CUDA GPU visible to $PYTHON; nothing to check" >&2; exit 1; fi
  nvidia-smi -L || true
else
  GPUS=2  # processes of the torchrun runs on the CPU
fi
COMMON="--set train.epochs=$EPOCHS --set train.eval_every=1000 --set train.device=$DEVICE --set data.workers=$WORKERS $EXTRA"
BATCH=$(( 16 / GPUS * GPUS ))
mkdir -p "$OUT"
run() {  # NAME COMMAND...: skipped when OUT/NAME has finished already
  local name=$1; shift
  if [ -f "$OUT/$name/results.json" ]; then echo "done already: $OUT/$name"; return 0; fi
  rm -rf "${OUT:?}/$name"
  echo "start: $OUT/$name"
  "$@" --out "$OUT/$name" > "$OUT/$name.log" 2>&1 || { echo "FAILED: $OUT/$name (see $OUT/$name.log)"; return 1; }
}
if [ "$DEVICE" = cuda ]; then ONE=(env CUDA_VISIBLE_DEVICES=0); else ONE=(env); fi
# shellcheck disable=SC2086
{
  run gpu1_fp32 "${ONE[@]}" $KDET distill bccd_distill $COMMON
  run gpu1_bf16 "${ONE[@]}" $KDET distill bccd_distill $COMMON --set train.amp=bf16
  [ "$DEVICE" = cuda ] && run gpu1_fp16 "${ONE[@]}" $KDET distill bccd_distill $COMMON --set train.amp=fp16
  if [ "$GPUS" -ge 2 ]; then
    SYNC=$([ "$DEVICE" = cuda ] && echo "--set train.sync_bn=true" || true)
    run "gpu${GPUS}_fp32" $TORCHRUN --nproc-per-node "$GPUS" -m kdet distill bccd_distill $COMMON --set train.batch_size=$BATCH
    run "gpu${GPUS}_bf16_syncbn" $TORCHRUN --nproc-per-node "$GPUS" -m kdet distill bccd_distill $COMMON \
      --set train.batch_size=$BATCH --set train.amp=bf16 $SYNC
  fi
}
"$PYTHON" - "$OUT" <<'EOF'
import json, statistics, sys
from pathlib import Path

out = Path(sys.argv[1])
print("| run | processes | batch per process | first epoch (s) | later epochs, median (s) | test AP@[.5:.95] |")
print("|---|---|---|---|---|---|")
for run in sorted(p for p in out.iterdir() if (p / "results.json").is_file()):
    times = [json.loads(line)["train_time_s"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    later = f"{statistics.median(times[1:]):.1f}" if len(times) > 1 else "-"
    results = json.loads((run / "results.json").read_text())
    processes = results.get("processes", 1)
    print(f"| {run.name} | {processes} | {results['batch_size'] // processes} | {times[0]:.1f} | {later} | "
          f"{results['metrics']['coco']['AP']:.3f} |")
EOF

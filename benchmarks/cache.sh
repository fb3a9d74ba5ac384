#!/usr/bin/env bash
# Epoch time of distillation with and without the teacher-output cache, relative to plain student
# training: bccd_student (no teacher), bccd_distill (teacher on every batch), bccd_distill with
# --teacher-cache (built by the first cached run, reused by the second), and the other methods'
# terms with the teacher live (l2_logits, kl, fitnet: what a method costs per epoch without the
# cache). EPOCHS epochs each, 2 threads, run one after another: run it on an otherwise idle machine.
#   benchmarks/cache.sh [OUT_DIR] [EPOCHS]      (default runs/cache_time, 4 epochs)
# prints a Markdown table; the runs stay in OUT_DIR.
set -euo pipefail
OUT=${1:-runs/cache_time}
EPOCHS=${2:-4}
KDET=${KDET:-kdet}
COMMON="--set train.epochs=$EPOCHS --set train.threads=2 --set train.eval_every=1000"
mkdir -p "$OUT"
source "$(dirname "$0")/queue.sh"
run_queue 1 \
  "$KDET train bccd_student $COMMON --out $OUT/plain" \
  "$KDET distill bccd_distill $COMMON --out $OUT/live" \
  "$KDET distill bccd_distill $COMMON --teacher-cache $OUT/teacher_cache --out $OUT/cached" \
  "$KDET distill bccd_distill $COMMON --teacher-cache $OUT/teacher_cache --out $OUT/cached_again" \
  "$KDET distill bccd_distill $COMMON --set 'distill.terms=[{loss: l2_logits, weight: 1.0}]' --out $OUT/live_l2_logits" \
  "$KDET distill bccd_distill $COMMON --set 'distill.terms=[{loss: kl, weight: 1.0, args: {temperature: 2.0}}]' --out $OUT/live_kl" \
  "$KDET distill bccd_distill $COMMON --set 'distill.terms=[{loss: fitnet, student: neck, weight: 0.5}]' --out $OUT/live_fitnet"
python - "$OUT" <<'EOF'
import json, statistics, sys
from pathlib import Path

out = Path(sys.argv[1])

def epoch_times(run):
    times = [json.loads(line)["train_time_s"] for line in (out / run / "metrics.jsonl").read_text().splitlines()]
    return times[1:] if len(times) > 1 else times  # the first epoch also warms up allocators and caches

plain = statistics.median(epoch_times("plain"))
print("| run | epoch time (median, s) | vs plain | cache build (s) | cache on disk | test AP |")
print("|---|---|---|---|---|---|")
for run in ("plain", "live", "cached", "cached_again", "live_l2_logits", "live_kl", "live_fitnet"):
    results = json.loads((out / run / "results.json").read_text())
    cache = results.get("teacher_cache", {})
    median = statistics.median(epoch_times(run))
    build = f"{cache['build_time_s']:.0f} ({cache['built_entries']} entries)" if cache else "-"
    size = f"{cache['bytes'] / 2**20:.0f} MB ({cache['views']} views)" if cache else "-"
    print(f"| {run} | {median:.1f} | {median / plain:.2f}x | {build} | {size} | {results['metrics']['coco']['AP']:.3f} |")
EOF

#!/usr/bin/env bash
# Prune, then distil, on BCCD: the bundled size-s DFL model (bccd_teacher_dfl) pruned by RATIO
# (L1, kdet prune), then per seed fine-tuned on the labels (`finetune`, kdet train) and distilled
# from the unpruned model with kdet's default recipe (`distill`, kdet distill), both on the
# schedule of benchmarks/configs/bccd_prune_distill.yaml, the teacher run live; 1 thread per run,
# validation every 4 epochs. Then the unpruned and the pruned (untrained) models are scored on the
# test split and every model is profiled (parameters, FLOPs, CPU latency at 1 thread).
# Resumable (see queue.sh).
#   benchmarks/prune.sh OUT_DIR "SEEDS" [RATIO]
#   e.g. benchmarks/prune.sh runs/prune_bccd "0 1 2"
# then: python benchmarks/paired.py OUT_DIR finetune distill
set -euo pipefail
OUT=$1; SEEDS=$2; RATIO=${3:-0.5}
KDET=${KDET:-kdet}
PARALLEL=${PARALLEL:-1}
CONFIG=benchmarks/configs/bccd_prune_distill.yaml
mkdir -p "$OUT"
[ -f "$OUT/pruned.pt" ] || $KDET prune bundled:bccd_teacher_dfl --ratio "$RATIO" --out "$OUT/pruned.pt"
COMMON="--set train.threads=1 --set train.eval_every=4 --set model.weights=$OUT/pruned.pt"
jobs=()
for seed in $SEEDS; do
  jobs+=("$KDET train $CONFIG $COMMON --set seed=$seed --out $OUT/finetune-s$seed")
  jobs+=("$KDET distill $CONFIG $COMMON --set seed=$seed --out $OUT/distill-s$seed")
done
source "$(dirname "$0")/queue.sh"
run_queue "$PARALLEL" "${jobs[@]}"
for model in bundled:bccd_teacher_dfl "$OUT/pruned.pt"; do
  name=$([ "$model" = "$OUT/pruned.pt" ] && echo pruned || echo unpruned)
  [ -f "$OUT/$name-eval.json" ] || $KDET eval "$model" --data bundled:bccd --split test --json > "$OUT/$name-eval.json"
  [ -f "$OUT/$name-profile.json" ] || $KDET profile "$model" --threads 1 --json > "$OUT/$name-profile.json"
done

#!/usr/bin/env bash
# Distillation on bundled BCCD (320 px): teacher bccd_teacher (cspdarknet-s) -> student
# cspdarknet-t, 20 epochs, seeds 0 1 2. Baseline (no KD) and every method share data, schedule
# and seed; every method for seeds 0, 1, 2. Also the teacher-size effect: a teacher of the student's own size (cspdarknet-t, the
# bccd_student recipe: 40 epochs, seed 0) for the same student. Validation every 4 epochs
# (epochs 4, 8, ..., 20), the same for every run. Runs already finished are skipped, runs with a
# last.pt are resumed, so the script can be stopped and started again.
#   benchmarks/distill.sh [OUT_DIR] [PARALLEL]     (default runs/kd20, 2 runs at a time, 1 thread each)
# then: kdet compare OUT_DIR/*-s?/ [--markdown]
set -euo pipefail
OUT=${1:-runs/kd20}
PARALLEL=${2:-2}
KDET=${KDET:-kdet}
EPOCHS=20
COMMON="--set train.epochs=$EPOCHS --set train.threads=1 --set train.eval_every=4"
mkdir -p "$OUT"
jobs=()
TERMS_OBJ="[{loss: objectness_scaled, weight: 1.0}]"
TERMS_OBJ_BALANCED="[{loss: objectness_scaled, weight: 1.0, args: {box_weight: 0.05}}]"
COSINE="--set distill.schedule=cosine --set distill.final_ratio=0.0"
job_cosine() { echo "$KDET distill bccd_distill $COMMON --set seed=$1 --set 'distill.terms=$TERMS_OBJ_BALANCED' $COSINE --out $OUT/objectness_scaled_box0.05_cosine-s$1"; }
for seed in 0 1 2; do
  if [ $seed = 1 ]; then jobs+=("$KDET train bccd_student --set train.threads=1 --out $OUT/teacher_t"); fi
  jobs+=("$KDET train bccd_student $COMMON --set seed=$seed --out $OUT/baseline-s$seed")
  jobs+=("$KDET distill bccd_distill $COMMON --set seed=$seed --set 'distill.terms=$TERMS_OBJ' --out $OUT/objectness_scaled-s$seed")
  jobs+=("$KDET distill bccd_distill $COMMON --set seed=$seed --set 'distill.terms=$TERMS_OBJ_BALANCED' --out $OUT/objectness_scaled_box0.05-s$seed")
  jobs+=("$KDET distill bccd_distill $COMMON --set seed=$seed --set 'distill.terms=[{loss: l2_logits, weight: 1.0}]' --out $OUT/l2_logits-s$seed")
  jobs+=("$KDET distill bccd_distill $COMMON --set seed=$seed --set 'distill.terms=[{loss: kl, weight: 1.0, args: {temperature: 2.0}}]' --out $OUT/kl-s$seed")
  jobs+=("$KDET distill bccd_distill $COMMON --set seed=$seed --set 'distill.terms=[{loss: fitnet, student: neck, weight: 0.5}]' --out $OUT/fitnet-s$seed")
done
# teacher-size effect: the same student and terms, taught by a teacher of the student's own size
for seed in 0 1; do
  jobs+=("$KDET distill bccd_distill $COMMON --set seed=$seed --set teacher.checkpoint=$OUT/teacher_t/best.pt --set 'distill.terms=$TERMS_OBJ_BALANCED' --out $OUT/objectness_scaled_box0.05-teacher_t-s$seed")
done
# the same terms with their weights decaying to 0 over training (seeds 0 and 1)
jobs+=("$(job_cosine 0)" "$(job_cosine 1)")
source "$(dirname "$0")/queue.sh"
run_queue "$PARALLEL" "${jobs[@]}"

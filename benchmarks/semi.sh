#!/usr/bin/env bash
# How much labelling does distillation on unlabelled images replace? For each labelled fraction F
# (data.labelled_fraction, labelled_seed 0): a size-s DFL teacher trained on that part alone,
# then per seed the size-p DFL student on the part alone (`base`, kdet train) and distilled from
# that teacher with kdet's default recipe on the part plus the rest of the training split as
# unlabelled images (`kd`, kdet distill, data.unlabelled: train_rest, the teacher run live). Every
# run of fraction F gets 40/F epochs (validation every 4/F), so it takes as many optimiser steps as
# the 40-epoch run on every label; that run (the student on 100% of the labels) is the ceiling:
# benchmarks/prove.sh bccd_dfl_p ... baseline. 1 thread per run. Resumable (see queue.sh).
#   benchmarks/semi.sh OUT_DIR "FRACTIONS" "SEEDS"
#   e.g. benchmarks/semi.sh runs/semi_bccd "0.1 0.25" "0 1 2"
# then, per fraction: python benchmarks/paired.py OUT_DIR/f0.1 base kd
set -euo pipefail
OUT=$1; FRACTIONS=$2; SEEDS=$3
KDET=${KDET:-kdet}
PARALLEL=${PARALLEL:-1}
TEACHER=bccd_student_dfl; STUDENT=bccd_student_dfl; DISTILL=benchmarks/configs/bccd_dfl_distill.yaml
source "$(dirname "$0")/queue.sh"
for f in $FRACTIONS; do
  epochs=$(python3 -c "print(round(40 / $f))"); every=$(python3 -c "print(max(1, round(4 / $f)))")
  dir=$OUT/f$f
  mkdir -p "$dir"
  COMMON="--set train.threads=1 --set data.labelled_fraction=$f --set data.labelled_seed=0 --set train.epochs=$epochs --set train.eval_every=$every"
  run_queue 1 "$KDET train $TEACHER $COMMON --set model.size=s --set seed=0 --out $dir/teacher"
  jobs=()
  for seed in $SEEDS; do
    jobs+=("$KDET train $STUDENT $COMMON --set model.size=p --set seed=$seed --out $dir/base-s$seed")
    jobs+=("$KDET distill $DISTILL $COMMON --set seed=$seed --set teacher.checkpoint=$dir/teacher/best.pt --set data.unlabelled=train_rest --set 'distill.terms=[]' --out $dir/kd-s$seed")
  done
  run_queue "$PARALLEL" "${jobs[@]}"
done

#!/usr/bin/env bash
# Several teachers: two specialists, each trained on some of BCCD's classes, teach one student
# every class. `kdet data convert --classes` writes each specialist's data (RBC only; WBC and
# Platelets); a size-s DFL teacher is trained on each (40 epochs, seed 0, the splits of the
# bundled copy). Per seed, the size-p DFL student (40 epochs):
#   baseline     kdet train, the student alone
#   specialists  kdet distill from both specialists: soft_bce (weight: auto at fraction 0.5),
#                which reads every teacher and takes each class from the teacher that knows it
#   generalist   the same term from one size-s teacher trained on all classes (the bundled
#                kdet/assets/models/bccd_teacher_dfl.pt), for comparison
# 1 thread per run, validation every 4 epochs, teacher cache in OUT_DIR/teacher_cache (one entry
# per teacher). Resumable (see queue.sh): run the same command again.
#   benchmarks/specialists.sh OUT_DIR "SEEDS"
#   e.g. benchmarks/specialists.sh runs/specialists_bccd "0 1 2"
# then: python benchmarks/paired.py OUT_DIR baseline specialists generalist
set -euo pipefail
OUT=$1; SEEDS=$2
source "$(dirname "$0")/queue.sh"  # also KDET and PARALLEL
mkdir -p "$OUT"
COMMON="--set train.threads=1 --set train.eval_every=4"
declare -A CLASSES=([rbc]="RBC" [wbc_platelets]="WBC,Platelets")
teachers=()
for name in rbc wbc_platelets; do
  [ -d "$OUT/data-$name" ] || $KDET data convert bundled:bccd --to voc --out "$OUT/data-$name" --classes "${CLASSES[$name]}"
  teachers+=("$KDET train bccd_student_dfl $COMMON --set model.size=s --set seed=0 --set data.path=$OUT/data-$name --out $OUT/teacher-$name")
done
run_queue "$PARALLEL" "${teachers[@]}"
TERMS="[{loss: soft_bce, weight: auto}]"
TWO="[{name: rbc, checkpoint: $OUT/teacher-rbc/best.pt}, {name: wbc_platelets, checkpoint: $OUT/teacher-wbc_platelets/best.pt}]"
DISTILL="bccd_student_dfl $COMMON --set distill.auto.fraction=0.5 --set 'distill.terms=$TERMS' --teacher-cache $OUT/teacher_cache"
jobs=()
for seed in $SEEDS; do
  jobs+=("$KDET train bccd_student_dfl $COMMON --set model.size=p --set seed=$seed --out $OUT/baseline-s$seed")
  jobs+=("$KDET distill $DISTILL --set model.size=p --set seed=$seed --set 'teacher=$TWO' --out $OUT/specialists-s$seed")
  jobs+=("$KDET distill $DISTILL --set model.size=p --set seed=$seed --set teacher.checkpoint=bundled:bccd_teacher_dfl --out $OUT/generalist-s$seed")
done
run_queue "$PARALLEL" "${jobs[@]}"

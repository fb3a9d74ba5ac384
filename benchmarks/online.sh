#!/usr/bin/env bash
# Online (mutual) distillation on BCCD: per seed, the size-p DFL student alone (`baseline`, kdet
# train) and trained together with a size-s DFL teacher that starts untrained (`online`: kdet
# distill with teacher {model: {size: s}, train: true}; the teacher's class probabilities as soft
# labels for the student and, reversed, the student's for the teacher: soft_bce at weight 1.0,
# about what weight: auto chose for it with trained teachers; weight: auto would be measured while
# both models are untrained and nearly agree, as with the mean teacher, where it chose weights in
# the thousands). 40 epochs, 1 thread per run, validation every 4 epochs. results.json of an
# online run scores both models on the test split (the teacher under `teacher`); compare the
# teacher with the size-s DFL teacher trained alone (bundled: kdet/assets/models/bccd_teacher_dfl.pt,
# seed 0, 0.557 AP@[.5:.95]). Resumable (see queue.sh): run the same command again.
# An online run trains both models: about 2 min per epoch on one core of the 2-core CPU beside another
# run (80 min per seed), against 12 to 20 s for the baseline.
#   benchmarks/online.sh OUT_DIR "SEEDS"
#   e.g. benchmarks/online.sh runs/online_bccd "0 1 2"
# then: python benchmarks/paired.py OUT_DIR baseline online
set -euo pipefail
OUT=$1; SEEDS=$2
source "$(dirname "$0")/queue.sh"  # also KDET and PARALLEL
mkdir -p "$OUT"
COMMON="--set train.threads=1 --set train.eval_every=4 --set model.size=p"
TEACHER="{model: {family: yolo, backbone: cspdarknet, size: s, head: dfl}, train: true}"
jobs=()
for seed in $SEEDS; do
  jobs+=("$KDET train bccd_student_dfl $COMMON --set seed=$seed --out $OUT/baseline-s$seed")
  jobs+=("$KDET distill bccd_student_dfl $COMMON --set seed=$seed --set 'teacher=$TEACHER' --set 'distill.terms=[{loss: soft_bce, weight: 1.0}]' --out $OUT/online-s$seed")
done
run_queue "$PARALLEL" "${jobs[@]}"

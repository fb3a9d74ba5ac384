#!/usr/bin/env bash
# The distillation methods against their paired baseline student on one test bed, for the seeds
# and arms given. Every arm is the bed's distillation config with the terms below; the baseline
# is `kdet train` on the same config (the student alone: same data, schedule and seed). The
# teacher's outputs are read from a teacher cache in OUT_DIR/teacher_cache (one subdirectory per
# seed; built by the first run that needs it; CACHE=0 runs the teacher live instead). Validation
# every 4 epochs, 1 thread per run. EPOCHS=N sets every run's schedule (give it its own OUT_DIR).
# Resumable (see queue.sh): finished runs are skipped, interrupted ones resumed.
#   benchmarks/prove.sh BED OUT_DIR "SEEDS" ARM...  BED: bccd_p | cs_p | bccd_dfl_p | cs_dfl_p | bccd_vit_p | bccd_u26 | cs_u26
# (bccd_dfl_p, cs_dfl_p: DFL heads on both sides; their teachers:
#  kdet train bccd_student_dfl --set model.size=s --set train.threads=1 --out runs/prove_bccd_dfl/teacher
#  kdet train benchmarks/configs/cs_teacher.yaml --set model.head=dfl --set train.threads=1
#    --set train.eval_every=4 --out runs/prove_cs_dfl/teacher
#  bccd_vit_p: the seed-000 cross-family pair, a ViT-backbone FCOS teacher and the size-p DFL student:
#  kdet train benchmarks/configs/bccd_vit_teacher.yaml --set train.threads=1 --set train.eval_every=4
#    --out runs/prove_bccd_vit/teacher
#  bccd_u26: the Ultralytics pair, YOLO26s teacher -> YOLO26n student, both Ultralytics models; the
#  teacher is the one benchmarks/peer_ultralytics.py trains, runs/peer_bccd/teacher/weights/best.pt;
#  cs_u26: the same on the construction-safety subset, teacher runs/peer_cs/teacher/weights/best.pt)
# ARM `default` gives no terms: kdet's default recipe for the pair (`kdet check` names it).
# ARM `self_ema`: the student's own moving average as its teacher, in eval mode (teacher: {self: ema,
# batch_stats: false}; no teacher cache: that teacher changes every step), the terms of the DFL pairs' recipe, ld and soft_bce, at
# weight 1.0 (weight: auto is refused with such a teacher), the student's own assignment;
# `self_bce` and `self_ld` the same with one of the two terms; `self_ema_b20` and `self_bce_b20` the
# same after a burn-in (distill.start_epoch=20: the first 19 epochs train on the labels alone);
# `self_ema_bs` and `self_ema_b20_bs` are self_ema and self_ema_b20 with the average's BatchNorm
# layers on the batch's statistics (teacher.batch_stats), as the student's are in training.
# ARM `born_again`: the bed's own baseline of the same seed (OUT_DIR/baseline-sSEED/best.pt, run
# it first) teaches a fresh copy of itself with kdet's default recipe for the pair, the teacher
# live (a born-again generation, as `kdet chain` with `chain: [{}, {}]` runs it).
#   e.g. benchmarks/prove.sh bccd_p runs/prove_bccd "0 1 2" baseline recipe pkd
# then: python benchmarks/paired.py OUT_DIR baseline ARM...
set -euo pipefail
BED=$1; OUT=$2; SEEDS=$3; shift 3
KDET=${KDET:-kdet}
PARALLEL=${PARALLEL:-1}
CACHE_ARG="--teacher-cache $OUT/teacher_cache"
[ "${CACHE:-1}" = 0 ] && CACHE_ARG=""
case $BED in
  bccd_p) TRAIN="bccd_student"; DISTILL="bccd_distill"; BED_SET="--set model.size=p" ;;
  bccd_dfl_p) TRAIN="bccd_student_dfl"; DISTILL="benchmarks/configs/bccd_dfl_distill.yaml"; BED_SET="--set model.size=p" ;;
  cs_p) TRAIN="benchmarks/configs/cs_student.yaml"; DISTILL="benchmarks/configs/cs_distill.yaml"; BED_SET="" ;;
  cs_dfl_p) TRAIN="benchmarks/configs/cs_dfl_student.yaml"; DISTILL="benchmarks/configs/cs_dfl_distill.yaml"; BED_SET="" ;;
  bccd_vit_p) TRAIN="bccd_student_dfl"; DISTILL="benchmarks/configs/bccd_vit_distill.yaml"; BED_SET="--set model.size=p" ;;
  bccd_u26) TRAIN="benchmarks/configs/bccd_u26_student.yaml"; DISTILL="benchmarks/configs/bccd_u26_distill.yaml"; BED_SET="" ;;
  cs_u26) TRAIN="benchmarks/configs/cs_u26_student.yaml"; DISTILL="benchmarks/configs/cs_u26_distill.yaml"; BED_SET="" ;;
  *) echo "unknown test bed $BED (bccd_p, cs_p, bccd_dfl_p, cs_dfl_p, bccd_vit_p, bccd_u26, cs_u26)"; exit 2 ;;
esac
RECIPE="{loss: objectness_scaled, args: {box_weight: 0.05}}"
declare -A TERMS=(
  [default]="[]"
  [self_ema]="[{loss: ld, weight: 1.0}, {loss: soft_bce, weight: 1.0}]"
  [self_bce]="[{loss: soft_bce, weight: 1.0}]"
  [self_ld]="[{loss: ld, weight: 1.0}]"
  [self_ema_b20]="[{loss: ld, weight: 1.0}, {loss: soft_bce, weight: 1.0}]"
  [self_bce_b20]="[{loss: soft_bce, weight: 1.0}]"
  [self_ema_bs]="[{loss: ld, weight: 1.0}, {loss: soft_bce, weight: 1.0}]"
  [self_ema_b20_bs]="[{loss: ld, weight: 1.0}, {loss: soft_bce, weight: 1.0}]"
  [born_again]="[]"
  [recipe]="[$RECIPE]"
  [pkd]="[{loss: pkd, student: neck, weight: auto}]"
  [cwd]="[{loss: cwd, student: neck, weight: auto}]"
  [fgd]="[{loss: fgd, student: neck, weight: auto}]"
  [mgd]="[{loss: mgd, student: neck, weight: auto}]"
  [score_l2]="[{loss: score_l2, student: neck, weight: auto}]"
  [relation]="[{loss: relation, student: neck, weight: auto}]"
  [fitnet_gt]="[{loss: fitnet, student: neck, mask: gt, weight: auto}]"
  [recipe_pkd]="[$RECIPE, {loss: pkd, student: neck, weight: auto}]"
  [recipe_cwd]="[$RECIPE, {loss: cwd, student: neck, weight: auto}]"
  [recipe_pkd_f1]="[$RECIPE, {loss: pkd, student: neck, weight: auto}]"
  [pkd_f1]="[{loss: pkd, student: neck, weight: auto}]"
  [recipe_pkd_stop]="[$RECIPE, {loss: pkd, student: neck, weight: auto}]"
  [cwd_f1]="[{loss: cwd, student: neck, weight: auto}]"
  [fgd_f1]="[{loss: fgd, student: neck, weight: auto}]"
  [score_l2_f1]="[{loss: score_l2, student: neck, weight: auto}]"
  [recipe_cwd_f1]="[$RECIPE, {loss: cwd, student: neck, weight: auto}]"
  [ld]="[{loss: ld, weight: auto}]"
  [ld_bce]="[{loss: ld, weight: auto}, {loss: soft_bce, weight: auto}]"
  [ld_bce_assign]="[{loss: ld, weight: auto}, {loss: soft_bce, weight: auto}]"
  [bce_assign]="[{loss: soft_bce, weight: auto}]"
  [os_auto1]="[{loss: objectness_scaled, args: {box_weight: 0.05}, weight: auto}]"
  [os_auto05]="[{loss: objectness_scaled, args: {box_weight: 0.05}, weight: auto}]"
  [os_auto03]="[{loss: objectness_scaled, args: {box_weight: 0.05}, weight: auto}]"
)
# settings besides the terms
declare -A EXTRA=(
  [recipe_pkd_f1]="--set distill.auto.fraction=1.0"
  [pkd_f1]="--set distill.auto.fraction=1.0"
  [recipe_pkd_stop]="--set distill.stop_epoch=32"
  [cwd_f1]="--set distill.auto.fraction=1.0"
  [fgd_f1]="--set distill.auto.fraction=1.0"
  [score_l2_f1]="--set distill.auto.fraction=1.0"
  [recipe_cwd_f1]="--set distill.auto.fraction=1.0"
  [ld]="--set distill.auto.fraction=0.5"
  [ld_bce]="--set distill.auto.fraction=0.5"
  [ld_bce_assign]="--set distill.assign=teacher --set distill.auto.fraction=0.5"
  [bce_assign]="--set distill.assign=teacher --set distill.auto.fraction=0.5"
  [os_auto1]="--set distill.auto.fraction=1.0"
  [os_auto05]="--set distill.auto.fraction=0.5"
  [os_auto03]="--set distill.auto.fraction=0.3"
  [self_ema]="--set 'teacher={self: ema, batch_stats: false}'"
  [self_bce]="--set 'teacher={self: ema, batch_stats: false}'"
  [self_ld]="--set 'teacher={self: ema, batch_stats: false}'"
  [self_ema_b20]="--set 'teacher={self: ema, batch_stats: false}' --set distill.start_epoch=20"
  [self_bce_b20]="--set 'teacher={self: ema, batch_stats: false}' --set distill.start_epoch=20"
  [self_ema_bs]="--set 'teacher={self: ema, batch_stats: true}'"
  [self_ema_b20_bs]="--set 'teacher={self: ema, batch_stats: true}' --set distill.start_epoch=20"
)
COMMON="--set train.threads=1 --set train.eval_every=4 $BED_SET"
# EPOCHS=N: every run (baseline and arms) on an N-epoch schedule instead of the bed's
[ -n "${EPOCHS:-}" ] && COMMON="$COMMON --set train.epochs=$EPOCHS"
mkdir -p "$OUT"
jobs=()
for seed in $SEEDS; do
  for arm in "$@"; do
    if [ "$arm" = baseline ]; then
      jobs+=("$KDET train $TRAIN $COMMON --set seed=$seed --out $OUT/baseline-s$seed")
    elif [ -n "${TERMS[$arm]:-}" ]; then
      cache=$CACHE_ARG; extra=${EXTRA[$arm]:-}
      case $arm in self_*) cache="" ;; esac
      [ "$arm" = born_again ] && { cache=""; extra="--set teacher.checkpoint=$OUT/baseline-s$seed/best.pt"; }
      jobs+=("$KDET distill $DISTILL $COMMON --set seed=$seed --set 'distill.terms=${TERMS[$arm]}' $extra $cache --out $OUT/$arm-s$seed")
    else
      echo "unknown arm $arm (baseline ${!TERMS[*]})"; exit 2
    fi
  done
done
source "$(dirname "$0")/queue.sh"
run_queue "$PARALLEL" "${jobs[@]}"

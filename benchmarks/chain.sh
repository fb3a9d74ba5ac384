#!/usr/bin/env bash
# Teacher-assistant chain against direct distillation, per seed: `kdet chain` on
# benchmarks/configs/bccd_chain.yaml (the bundled size-s DFL teacher -> a size-t assistant -> the
# size-p student, plus the baseline and the direct distillation) into OUT_DIR/s<seed>, 1 thread
# per run, validation every 4 epochs, the teacher run live. Resumable: kdet chain skips finished
# stages and resumes an interrupted one; run the same command again.
#   benchmarks/chain.sh OUT_DIR "SEEDS" [CONFIG]
#   e.g. benchmarks/chain.sh runs/chain_bccd "0 1 2"
# Each seed's table (gap closed against the chain's teacher) is OUT_DIR/s<seed>/compare.md; over
# seeds: python benchmarks/paired.py OUT_DIR/flat baseline direct chained (ΔAP per seed; its
# "gap closed" for `chained` is against that run's own teacher, the assistant)
set -euo pipefail
OUT=$1; SEEDS=$2; CONFIG=${3:-benchmarks/configs/bccd_chain.yaml}
KDET=${KDET:-kdet}
for seed in $SEEDS; do
  $KDET chain "$CONFIG" --set seed="$seed" --set train.threads=1 --set train.eval_every=4 --out "$OUT/s$seed"
  # paired.py reads <arm>-s<seed>/: link each seed's runs under one folder
  mkdir -p "$OUT/flat"
  for run in "$OUT/s$seed"/*/; do
    run=${run%/}; name=$(basename "$run")
    [ -f "$run/results.json" ] && ln -sfn "../s$seed/$name" "$OUT/flat/${name#*-}-s$seed"
  done
done

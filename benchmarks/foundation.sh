#!/usr/bin/env bash
# Reproduces the foundation table of BENCHMARKS.md: the BCCD teacher and student recipes trained
# from scratch on the bundled data at 320 px, scored on the test split, then tabulated.
# Usage: bash benchmarks/foundation.sh [SEED ...]   (default: seed 0)
set -euo pipefail
cd "$(dirname "$0")/.."
seeds=("${@:-0}")
runs=()
for seed in "${seeds[@]}"; do
  for recipe in bccd_teacher bccd_student; do
    out="runs/bench/${recipe}-seed${seed}"
    if [ -f "$out/results.json" ]; then echo "$out: done"; else
      if [ -f "$out/last.pt" ]; then resume=--resume; else resume=; fi
      kdet train "$recipe" --out "$out" --set "seed=$seed" $resume
    fi
    runs+=("$out")
  done
done
python benchmarks/table.py "${runs[@]}"

# Shared by the benchmark scripts: run a list of kdet commands, PARALLEL at a time.
# A command's run directory is what follows its --out. Finished runs (results.json) are skipped,
# runs with a last.pt are resumed, runs in progress in another process are left alone; each
# run's output is appended to RUN_DIR.log.
#   source benchmarks/queue.sh; run_queue PARALLEL "cmd1" "cmd2" ...
# Sourcing it also gives KDET (the kdet command) and PARALLEL (runs at a time) their defaults.
KDET=${KDET:-kdet}
PARALLEL=${PARALLEL:-1}
run_one() {
  local cmd=$1 out=${1##*--out }
  if [ -f "$out/results.json" ]; then echo "done already: $out"; return 0; fi
  # a kdet process of this run (its command line starts with the python that runs it, unlike the shells around it)
  if pgrep -f "^[^ ]*python[^ ]* .*kdet.* --out $out( --resume)?\$" > /dev/null; then echo "running elsewhere: $out"; return 0; fi
  if [ -f "$out/last.pt" ]; then cmd="$cmd --resume"; fi
  mkdir -p "$out"
  echo "start: $out"
  eval "$cmd" >> "$out.log" 2>&1 || { echo "FAILED: $out (see $out.log)"; return 1; }
  echo "done: $out"
}
run_queue() {
  local parallel=$1; shift
  export -f run_one
  export KDET
  printf '%s\0' "$@" | xargs -0 -P "$parallel" -I{} bash -c 'run_one "$@"' _ {}
}

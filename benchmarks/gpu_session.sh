#!/usr/bin/env bash
# What a session with a lent GPU machine runs there. The machine is lent for 15 minutes of device
# time in all, its start included, at most 10 minutes a command; so the most wanted figures come
# first, in ONE call that ends within 8 minutes of its start, and everything else is optional.
# First, here:
#   bash benchmarks/device_wheels.sh       # jsonargparse, docstring-parser, torchao into .whl/
# then one device call that carries `.whl` (give it a time limit of 8.5 minutes):
#   bash benchmarks/gpu_session.sh          # or `first`; estimates in docs/speed.md, "Time budget"
#     1. the wheels into /tmp/site                                         ~5 s      limit 45 s
#     2. GPT-2 124M training throughput, lmforge vs HF transformers eager and compiled, alternated
#        in 3 rounds, each row printed as it is measured, the table last (issue Core, point 9;
#        benchmarks/gpu_bench.py: no round starts that should end past 4 min)  ~3.5 min  limit 4.5 min
#     3. pytest -m gpu (SIGINT at its limit, so pytest still prints its summary)  ~3 min  to 7 min 50 s
#   Each step has its own hard limit, so a slow one cannot eat the others' time, and the call ends
#   8 minutes in at the latest (the tests' limit and 10 s to kill what is left). Arguments after
#   `first` go to gpu_bench.py (e.g. `--rounds 2`).
# Optional, only with device time left (the machine goes back soon after a call ends, and a fresh
# one costs its start again), most value per minute first; each ~4 minutes, so that one fits what a
# session has left after the first call (then add `--deadline-s 180`: no configuration starts later):
#   bash benchmarks/gpu_session.sh train --parts switches            # issue 5, points 1, 4  ~4 min
#   bash benchmarks/gpu_session.sh train --parts llama1b             # issue 5, points 2, 3  ~4 min
#   bash benchmarks/gpu_session.sh train --parts scale               # issue 3, point 6      ~4 min
#   bash benchmarks/gpu_session.sh train --parts corpus,host_sync    # issue 5, point 4      ~3.5 min
#   bash benchmarks/gpu_session.sh plan                              # issue 16, point 3     ~4 min
#   bash benchmarks/gpu_session.sh train --parts fp8_loss            # issue 5, point 2      ~6 min
#   bash benchmarks/gpu_session.sh train --parts speedrun            # issue 5, point 5      ~9 min
#   bash benchmarks/gpu_session.sh tests|bench [ARGS]                # step 3 or 2 alone, as a retry
# The corpus of host_sync, fp8_loss and speedrun is prepared in the background into /tmp/gpu_train;
# a later call reuses it only while the machine stays warm.
# Everything is written to $OUT as it comes, so a call cut off at its limit keeps what it measured:
# steps.txt (each step's wall time: to replace the estimates), gpu_bench.log and gpt2_vs_hf.jsonl,
# pytest_gpu.log and .xml, and for `train` gpu_train.log and rows.jsonl with each pretraining run's
# metrics (`python3 benchmarks/gpu_train.py --table FILE` prints that table again).
set -uo pipefail
what=${1:-first}
[ $# -gt 0 ] && shift
out=${OUT:-out}
mkdir -p "$out"
start=$SECONDS
step_started=$SECONDS
status=0

step_done() {  # NAME EXIT_STATUS: its wall time to steps.txt; the first failure is the call's status
  echo "$1: $(( SECONDS - step_started )) s, exit $2 ($(( SECONDS - start )) s into the call)" | tee -a "$out/steps.txt"
  [ "$status" -eq 0 ] && status=$2
  step_started=$SECONDS
}

if compgen -G ".whl/*.whl" >/dev/null; then
  timeout -k 5 45 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  step_done wheels $?
else  # gpu_bench.py does without them; the CLI, and so most GPU tests and `train`, do not
  echo "no .whl/*.whl: run benchmarks/device_wheels.sh here and carry .whl" | tee -a "$out/steps.txt" >&2
fi
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
{ timeout 15 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  git rev-parse --short HEAD 2>/dev/null; } | tee "$out/gpu.txt"

limited() {  # NAME SIGNAL LIMIT_S COMMAND...: COMMAND under `timeout`, shown and kept in $out/NAME.log
  local name=$1 signal=$2 limit=$3
  shift 3
  rm -f /tmp/gpu_session.pgid
  step_started=$SECONDS
  # `timeout` leads a process group of its own: COMMAND and what it started (compile workers, data
  # loader workers). COMMAND first writes the group's id, so that what is left of the group once
  # COMMAND has ended is killed: a leftover holding the log's pipe open would keep the call past
  # its limit.
  {
    timeout -s "$signal" -k 10 "$limit" bash -c 'echo "$PPID" > "$0"; exec "$@"' /tmp/gpu_session.pgid "$@"
    rc=$?
    [ -s /tmp/gpu_session.pgid ] && kill -KILL -- "-$(cat /tmp/gpu_session.pgid)" 2>/dev/null
    exit "$rc"
  } 2>&1 | tee "$out/$name.log"
  step_done "$name" "${PIPESTATUS[0]}"
}

gpt2_vs_hf() {  # LIMIT_S BUDGET_S [ARGS]: SIGTERM at the limit prints the table of what was measured
  local limit=$1 budget=$2
  shift 2
  limited gpu_bench TERM "$limit" python3 benchmarks/gpu_bench.py --budget-s "$budget" --results "$out" "$@"
}

gpu_tests() {  # LIMIT_S: SIGINT, not SIGTERM, at the limit: pytest then still prints its summary
  limited pytest_gpu INT "$1" python3 -m pytest -q -m gpu tests -p no:cacheprovider --durations=15 \
    --junitxml="$out/pytest_gpu.xml"
}

case $what in
  first)
    gpt2_vs_hf 270 230 "$@"  # the budget counts from after Python and torch start (~10 s): 4 min
    left=$(( 470 - (SECONDS - start) ))  # the tests end 7 min 50 s into the call at the latest
    if [ "$left" -ge 30 ]; then gpu_tests "$left"; else echo "no time left for pytest -m gpu" | tee -a "$out/steps.txt"; fi ;;
  tests) gpu_tests 570 ;;
  bench) gpt2_vs_hf 570 540 "$@" ;;
  # Configurations not started 8 minutes in are skipped, so the table is still printed in time.
  train) limited gpu_train TERM 580 python3 benchmarks/gpu_train.py --out /tmp/gpu_train --results "$out" \
           --deadline-s 480 "$@" ;;
  plan) limited plan_gpu_check TERM 570 python3 benchmarks/plan_gpu_check.py --results "$out" ;;
  *) echo "unknown: $what (first, tests, bench, train or plan)" >&2; exit 2 ;;
esac
echo "$(( SECONDS - start )) s in all" | tee -a "$out/steps.txt"
exit "$status"

#!/usr/bin/env bash
# What a session with a lent GPU machine runs there, one device call per group; each group fits the
# machine's 10-minute limit on one command (estimates in docs/speed.md). First, here:
#   bash benchmarks/device_wheels.sh            # jsonargparse, docstring-parser, torchao into .whl/
# then device calls that carry `.whl`, in this order (the most wanted figures first; make the calls
# back to back so the machine stays warm and Inductor's cache in /tmp carries over):
#   bash benchmarks/gpu_session.sh tests                                  # pytest -m gpu      ~3 min
#   bash benchmarks/gpu_session.sh train --parts gpt2,switches            # points 1, 4        ~7 min
#   bash benchmarks/gpu_session.sh train --parts llama1b,corpus           # points 2, 3, 5     ~6 min
#   bash benchmarks/gpu_session.sh train --parts speedrun                 # point 5            ~8 min
#   bash benchmarks/gpu_session.sh train --parts fp8_loss,host_sync       # points 2, 4        ~7 min
#   bash benchmarks/gpu_session.sh train --parts scale                    # issue 3, point 6   ~4 min
# About 35 minutes with the machine's start: more than one session's 30 minutes of device time, so
# the last calls will usually need a second session (a session spent on issue 3 runs `scale` first). The corpus is prepared (in the background,
# while llama 1b's GPU-bound steps run) into /tmp/gpu_train, which the next calls reuse while the
# machine stays warm; a cold machine prepares it again.
# Rows come back in $OUT/rows.jsonl as they are measured (with each pretraining run's metrics), so a
# call cut off at its limit keeps what it measured; `python3 benchmarks/gpu_train.py --table
# FILE` prints the table of such a file. Logs go to $OUT too.
set -uo pipefail
what=${1:?usage: gpu_session.sh tests|bench|train [ARGS]}
shift
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
out=${OUT:-out}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
git rev-parse --short HEAD 2>/dev/null | tee -a "$out/gpu.txt"
case $what in
  # SIGINT, not SIGTERM, at the limit: pytest then still prints its summary of failures.
  tests) timeout -s INT 570 python3 -m pytest -q -m gpu tests -p no:cacheprovider "$@" 2>&1 | tee "$out/pytest_gpu.log" ;;
  bench) timeout 570 python3 benchmarks/gpu_bench.py "$@" 2>&1 | tee "$out/gpu_bench.log" ;;
  # Configurations not started 8 minutes in are skipped, so the table is still printed in time.
  train) timeout 580 python3 benchmarks/gpu_train.py --out /tmp/gpu_train --results "$out" --deadline-s 480 "$@" \
           2>&1 | tee "$out/gpu_train.log" ;;
  *) echo "unknown: $what (tests, bench or train)" >&2; exit 2 ;;
esac

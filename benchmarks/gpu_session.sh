#!/usr/bin/env bash
# What a session with a lent GPU machine runs there, one device call per line (each under its
# 10-minute limit), after `bash benchmarks/device_wheels.sh` here; carry `.whl`:
#   bash benchmarks/gpu_session.sh tests                      # pytest -m gpu
#   bash benchmarks/gpu_session.sh bench                      # benchmarks/gpu_bench.py (GPT-2 vs HF)
#   bash benchmarks/gpu_session.sh train --parts gpt2,llama1b,switches
#   bash benchmarks/gpu_session.sh train --parts host_sync,fp8_loss,speedrun
# Logs go to $OUT (the device tool brings them back).
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
  tests) python3 -m pytest -q -m gpu tests -p no:cacheprovider "$@" 2>&1 | tee "$out/pytest_gpu.log" ;;
  bench) python3 benchmarks/gpu_bench.py "$@" 2>&1 | tee "$out/gpu_bench.log" ;;
  train) python3 benchmarks/gpu_train.py --out /tmp/gpu_train "$@" 2>&1 | tee "$out/gpu_train.log" ;;
  *) echo "unknown: $what (tests, bench or train)" >&2; exit 2 ;;
esac

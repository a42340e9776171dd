#!/usr/bin/env bash
# Wheels for the lent GPU machine, which has PyTorch, transformers, tokenizers, safetensors,
# tensorboard and matplotlib but no network and none of: jsonargparse (lmforge's CLI),
# docstring-parser (its help text), torchao (train.float8). Downloads them into .whl/ (ignored by
# git); a device run then carries `.whl` and starts with
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD/src || exit;
# after which `python3 -m lmforge ...`, `python3 benchmarks/gpu_train.py` and `python3 -m pytest -m gpu` run there.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir .whl
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any -d .whl \
  jsonargparse==4.53.0 docstring-parser==0.18.0 torchao==0.18.0
ls -la .whl

"""Helpers of the reliability tests: run the real CLI (one process or torchrun), read what it wrote.

Every fault in these tests is real: a process killed, stopped or signalled by itself at a named
point (LMFORGE_FAULT, see src/lmforge/faults.py) or from outside, never a mocked exception.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from safetensors import safe_open

RECIPE = Path(__file__).parents[2] / "recipes" / "debug.yaml"


def pretrain_args(data_dir: Path, out: Path, *extra: str, steps: int = 8, every: int = 4) -> list[str]:
    """The debug recipe on the test corpus: `steps` steps, a checkpoint every `every`, quiet."""
    return [
        "pretrain", "--config", str(RECIPE), "--out", str(out), f"--data.dir={data_dir}",
        "--logging.progress=false", "--logging.tensorboard=false", "--logging.plot=false",
        f"--train.max_steps={steps}", "--train.eval_every=0", "--train.sample_tokens=0",
        f"--checkpoint.every_steps={every}", "--checkpoint.keep_last=5", "--logging.log_every=1", *extra,
    ]  # fmt: skip


def run(
    args: list[str],
    cwd: Path,
    nproc: int = 1,
    fault: str | None = None,
    torchrun: tuple[str, ...] = (),
    timeout: float = 240,
) -> subprocess.CompletedProcess:
    """`lmforge ARGS` in one process, or under torchrun with `nproc` processes on this host."""
    if nproc == 1 and not torchrun:
        command = [sys.executable, "-m", "lmforge", *args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
                   *torchrun, "-m", "lmforge", *args]  # fmt: skip
    env = {**os.environ, "LMFORGE_FAULT": fault or ""}
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, timeout=timeout, env=env)


def records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records(run_dir) if "loss" in r}


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:07d}"


def tensors(directory: Path) -> dict:
    """Every tensor of the safetensors files in `directory`, by name."""
    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a dict
                out[key] = f.get_tensor(key)
    return out


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if "lmforge: error" in line]

"""Helpers of the reliability tests: run the real CLI (one process or torchrun), read what it wrote.

Every fault in these tests is real: a process killed, stopped or signalled by itself at a named
point (LMFORGE_FAULT, see src/lmforge/faults.py) or from outside, never a mocked exception.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
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
    with spawned(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        stdout, stderr = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)


@contextlib.contextmanager
def spawned(command: list[str], **popen_kwargs) -> Iterator[subprocess.Popen]:
    """Popen in a session of its own; on the way out (a failed assertion, a timeout) the whole
    process tree is SIGKILLed, so that a hung torchrun job never outlives its test."""
    proc = subprocess.Popen(command, text=True, start_new_session=True, **popen_kwargs)
    try:
        yield proc
    finally:
        # torchrun starts each worker in a session of its own: kill by descent, not by group.
        for pid in [*_descendants(proc.pid), proc.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.communicate()


def _descendants(root: int) -> list[int]:
    """Every process below `root`, from /proc (Linux)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def losses(run_dir: Path) -> dict[int, float]:
    """Step -> loss; a step logged twice (a resume that did not drop what it redid) fails."""
    steps = [r["step"] for r in records(run_dir) if "loss" in r]
    assert len(steps) == len(set(steps)), f"{run_dir}/metrics.jsonl logs a step twice: {steps}"
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


def error_lines(result: subprocess.CompletedProcess, torchrun: bool = False) -> list[str]:
    """The `lmforge: error:` lines of a run's stderr, after checking that nothing else is there but
    `lmforge: warning:` lines (a traceback or a second, raw error line fails the test). torchrun:
    the run was launched by torchrun, which adds its own report of a failed worker (its log lines
    and a ChildFailedError traceback): those are left out of the check, lmforge's own are not."""
    lines = result.stderr.splitlines()
    if torchrun and "torch.distributed.elastic.multiprocessing.errors.ChildFailedError" in result.stderr:
        # torchrun's report is its own traceback, the last one: a worker's raw traceback before it
        # stays in the checked lines (and fails the check)
        report = max(
            i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last)")
        )
        assert any("ChildFailedError" in line for line in lines[report:]), "torchrun's report is not last"
        lines = [line for line in lines[:report] if "torch/distributed/elastic/" not in line]
    other = [line for line in lines if not line.startswith(("lmforge: error: ", "lmforge: warning: "))]
    assert not other, f"stderr holds more than lmforge's error and warning lines: {other[:5]}"
    return [line for line in lines if line.startswith("lmforge: error: ")]

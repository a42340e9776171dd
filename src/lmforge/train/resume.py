"""Which checkpoint a run starts from: none, the newest valid one, a given one, or (auto) the
newest valid one if the run has any.

    resume=False     a new run; refused if the run directory already has checkpoints (except in a
                     job torchrun restarted, which resumes what its own first attempt started)
    resume=True      the newest valid checkpoint (older ones are tried, with a warning naming the bad
                     file); an error if there is none: never silently from scratch
    resume="auto"    resume=True if the run has a checkpoint, else a new run: what a requeued job
                     wants, whether or not it was preempted before its first checkpoint
    resume=PATH      exactly that checkpoint, verified, or an error
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from lmforge.config import RunConfig, load_config, to_dict
from lmforge.errors import CheckpointError, ConfigError
from lmforge.rundir import latest_checkpoint, list_checkpoints, verify_checkpoint
from lmforge.train.checkpoint import recover_interrupted_save
from lmforge.train.distributed import on_rank0

Resume = bool | Literal["auto"] | str | Path

JOB_MARKER = ".torchrun_job"  # RUN/.torchrun_job: the torchrun job (TORCHELASTIC_RUN_ID) that started the run

# Keys of the data section that change how fast data is read, not which tokens are trained on.
DATA_SPEED_KEYS = ("num_workers", "loader_workers")
# What a classification run derives from its data when it starts (the labels, the head's size), not
# what the user chose: a recipe resumed against the run's config.yaml leaves them out.
DERIVED = {"data": ("labels",)}


def start_checkpoint(run_dir: Path, cfg: RunConfig, resume: Resume) -> Path | None:
    """The checkpoint this run starts from (decided on rank 0, which alone reads every checksum),
    its config checked against `cfg`; None for a new run."""
    ckpt_dir = on_rank0(_checkpoint_to_resume, run_dir, resume)
    if ckpt_dir is not None:
        check_resume_compatible(load_config(ckpt_dir / "config.yaml"), cfg, run_dir)
    return ckpt_dir


def check_resume_compatible(saved: RunConfig, cfg: RunConfig, run_dir: Path) -> None:
    """A resumed run may change how long it trains, not what it trains."""
    for section in ("model", "data", "freeze", "lora"):
        old, new = to_dict(saved)[section], to_dict(cfg)[section]
        if section == "data":
            old, new = (
                {k: v for k, v in d.items() if k not in DATA_SPEED_KEYS + DERIVED["data"]} for d in (old, new)
            )
        if section == "model":
            old, new = (without_classes(d) for d in (old, new))
        if old != new:
            raise ConfigError(
                f"cannot resume {run_dir}: config section '{section}' differs from the run's config.yaml "
                f"({old} vs {new})"
            )


def without_classes(model: dict) -> dict:
    """A model section as a dict, without the classification head's size (model.shape.n_classes)."""
    shape = {k: v for k, v in (model.get("shape") or {}).items() if k != "n_classes"}
    return {**model, "shape": shape or None}


def mark_job(run_dir: Path) -> None:
    """Record the torchrun job that starts a run (in its first attempt), so that a restarted
    attempt of the same job resumes by itself (see _started_by_this_job)."""
    if "TORCHELASTIC_RUN_ID" in os.environ and restart_count() == 0:
        (run_dir / JOB_MARKER).write_text(os.environ["TORCHELASTIC_RUN_ID"])


def restart_count() -> int:
    """How many times torchrun restarted this job (0 outside torchrun)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def _checkpoint_to_resume(run_dir: Path, resume: Resume) -> Path | None:
    root = run_dir / "checkpoints"
    if root.is_dir():
        recover_interrupted_save(root)
    if resume == "auto":
        return latest_checkpoint(run_dir) if list_checkpoints(run_dir) else None
    if resume not in (True, False):
        assert isinstance(resume, str | Path)
        ckpt_dir = Path(resume)
        verify_checkpoint(ckpt_dir)
        return ckpt_dir
    if resume:
        if not run_dir.is_dir():
            raise CheckpointError(f"cannot resume: run directory {run_dir} does not exist")
        return latest_checkpoint(run_dir)
    if list_checkpoints(run_dir):
        if restart_count() > 0 and _started_by_this_job(run_dir):
            return latest_checkpoint(run_dir)
        raise CheckpointError(
            f"run directory {run_dir} already has checkpoints: pass --resume (or --resume auto), "
            "or choose another --out"
        )
    return None


def _started_by_this_job(run_dir: Path) -> bool:
    """A restarted attempt resumes by itself only a run its own job's first attempt started (not one
    that attempt refused to overwrite)."""
    marker = run_dir / JOB_MARKER
    job = os.environ.get("TORCHELASTIC_RUN_ID")
    return job is not None and marker.is_file() and marker.read_text() == job

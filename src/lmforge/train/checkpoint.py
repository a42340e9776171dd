"""Checkpoints: writing them, and restoring a training run from one; one format from one process to many.

The format (layout, manifest, finding and verifying a checkpoint, loading its weights) is
lmforge.rundir's; this module adds what only training needs: saving atomically under any layout,
the optimizer's tensors (`optimizer/`, keys `state.<param fqn>.<name>`), the trainer state
(step, data position, non-finite guard, loss scale, RNG states, optimizer scalars) and restoring
all of it.

Why this design: torch.distributed.checkpoint (DCP) runs in a single process too (no_dist=True)
and, under torchrun, lets every rank write its own shard and a later run load them under another
layout; its Hugging Face storage writer keeps the tensors in safetensors files, so loading never
unpickles anything. State that is not a tensor is JSON. A checkpoint is written into a hidden
temporary directory and renamed into place only when its manifest is complete: a crash mid-save
leaves the previous checkpoint as the newest valid one.
"""

from __future__ import annotations

import base64
import contextlib
import contextvars
import json
import os
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
from torch.distributed.tensor import DTensor

from lmforge.config import RunConfig, config_sha256, one_line, save_config
from lmforge.errors import CheckpointError
from lmforge.faults import fault
from lmforge.rundir import (
    FORMAT_VERSION,
    MANIFEST,
    TRAINER_STATE,
    checkpoint_name,
    head_alias,
    list_checkpoints,
    load_model_weights,
    load_tensors,
    model_state_dict,
    sha256_file,
    tensor_headers,
)

if TYPE_CHECKING:  # a type alias of torch's, not needed at run time (torch versions differ)
    from torch.distributed.checkpoint.state_dict import OptimizerStateType

# ---------------------------------------------------------------------------- tensors via DCP


# True inside writing_alone(): this process writes by itself, with no collectives.
_ALONE = contextvars.ContextVar("checkpoint_alone", default=False)


@contextlib.contextmanager
def writing_alone() -> Iterator[None]:
    """Inside, save_checkpoint writes a whole model as in one process, with no collectives (rank 0's
    work inside lmforge.train.distributed.on_rank0)."""
    token = _ALONE.set(True)
    try:
        yield
    finally:
        _ALONE.reset(token)


def _distributed() -> bool:
    return not _ALONE.get() and dist.is_available() and dist.is_initialized()


def _is_writer() -> bool:
    """Rank 0 writes what is not sharded (JSON, config, manifest) and renames the directory."""
    return not _distributed() or dist.get_rank() == 0


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def _save_tensors(tensors: dict[str, torch.Tensor], directory: Path) -> None:
    """Every rank writes its shards; they are then consolidated into whole safetensors files."""
    with warnings.catch_warnings():
        # DCP warns that it runs without a process group: in one process that is what we want.
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        if _distributed():
            writer = dcp.HuggingFaceStorageWriter(
                str(directory), save_distributed=True, enable_consolidation=True
            )
            dcp.save(tensors, storage_writer=writer)
        else:
            dcp.save(tensors, storage_writer=dcp.HuggingFaceStorageWriter(str(directory)), no_dist=True)
    _barrier()
    if _is_writer():
        # The per-rank shards were consolidated into whole tensors above; a resumed run of any
        # layout reads its slices from those.
        shutil.rmtree(directory / "sharded", ignore_errors=True)


# ---------------------------------------------------------------------------- save


def _fsync_tree(directory: Path) -> None:
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    for path in [directory, *[p for p in directory.rglob("*") if p.is_dir()]]:
        _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict:
    state: dict[str, str | list[str]] = {
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [
            base64.b64encode(s.numpy().tobytes()).decode() for s in torch.cuda.get_rng_state_all()
        ]
    return state


def set_rng_state(state: dict) -> None:
    def decode(text: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)

    torch.set_rng_state(decode(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([decode(s) for s in state["cuda"]])


def _optimizer_state(part: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(flat tensors, JSON-able rest) of one part's optimizer state, keyed by checkpoint name.

    get_optimizer_state_dict initialises a fresh optimizer's state, so the same call gives the
    template that a checkpoint is loaded into.
    """
    state = get_optimizer_state_dict(part, optimizer)
    alias = head_alias(part)
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    per_param = cast(
        dict[str, dict[str, Any]], state["state"]
    )  # DCP's OptimizerStateType: fqn -> {name: value}
    for fqn, param_state in per_param.items():
        for key, value in param_state.items():
            name = f"state.{alias.get(fqn, fqn)}.{key}"
            if isinstance(value, torch.Tensor) and value.ndim == 0 and not isinstance(value, DTensor):
                # 0-d tensors (Adam's `step`) go to JSON: DCP's consolidation of replicated 0-d
                # tensors across ranks writes zeros (seen with torch 2.13, gloo).
                scalars[name] = {"tensor": value.item(), "dtype": str(value.dtype).removeprefix("torch.")}
            elif isinstance(value, torch.Tensor):
                tensors[name] = value
            else:
                scalars[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _from_json(value):
    if isinstance(value, dict) and "tensor" in value:
        dtype = getattr(torch, str(value.get("dtype")), None)
        if not isinstance(dtype, torch.dtype) or not isinstance(value["tensor"], int | float):
            raise CheckpointError(f"trainer state: optimizer scalar {value} is not a number of a torch dtype")
        return torch.tensor(value["tensor"], dtype=dtype)
    return value


def save_checkpoint(
    run_dir: Path,
    step: int,
    parts: nn.Module | list[nn.Module],
    optimizers: torch.optim.Optimizer | list[torch.optim.Optimizer],
    trainer_state: dict,
    cfg: RunConfig,
    tokenizer_path: Path,
    keep_last: int,
) -> Path:
    """Write `run_dir/checkpoints/step_N` atomically and keep the newest `keep_last`.

    `parts`: the model, or this rank's pipeline stages (one optimizer each). Every rank calls this,
    unless inside `writing_alone()`. A failed write (a full disk, ...) raises CheckpointError on
    every rank and leaves no partial checkpoint behind: the previous one stays the newest valid
    checkpoint.
    """
    parts = parts if isinstance(parts, list) else [parts]
    optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
    root = run_dir / "checkpoints"
    final = root / checkpoint_name(step)
    tmp = root / f".{final.name}.tmp"

    def prepare() -> None:
        if _is_writer():
            root.mkdir(parents=True, exist_ok=True)
            # What a crash mid-save left: temporary directories (never valid) are removed, and a
            # checkpoint moved aside by a re-save is put back. No `.tmp` or `.old` is left after it.
            recover_interrupted_save(root)
            tmp.mkdir()

    def model_tensors() -> None:
        _save_tensors({k: v for part in parts for k, v in model_state_dict(part).items()}, tmp / "model")
        fault("checkpoint.mid_shard", step, shard_dir=tmp / "model" if _is_writer() else None)

    optim_scalars: dict = {}

    def optimizer_tensors() -> None:
        optim_tensors = {}
        for part, optimizer in zip(parts, optimizers, strict=True):
            tensors, rest = _optimizer_state(part, optimizer)
            optim_tensors.update(tensors)
            optim_scalars.update(rest["scalars"])
        _save_tensors(optim_tensors, tmp / "optimizer")

    def metadata() -> None:
        if _is_writer():
            # Scalars (Adam's step) are equal for every parameter of a run: rank 0's stand for all.
            state = {
                "step": step,
                **trainer_state,
                "rng": rng_state(),
                "optimizer": {"scalars": optim_scalars},
            }
            _write_metadata(tmp, step, state, cfg, tokenizer_path)

    try:
        # Every rank runs each phase, then learns whether any rank failed in it: a rank that fails
        # never leaves the others waiting in a collective it will not join.
        for phase in (prepare, model_tensors, optimizer_tensors, metadata):
            _all_ranks_ok(phase)
    except _SaveFailed as err:
        if _is_writer():
            shutil.rmtree(tmp, ignore_errors=True)
        previous = [p.name for p in list_checkpoints(run_dir)]
        raise CheckpointError(
            f"cannot write checkpoint {final} ({err}); "
            + (
                f"the newest checkpoint is still {previous[-1]}"
                if previous
                else "no earlier checkpoint exists"
            ),
            every_rank=_distributed(),
        ) from None
    if _is_writer():
        _publish(tmp, final, step)
        _prune(root, keep_last)
    _barrier()
    return final


class _SaveFailed(Exception):
    pass


def _all_ranks_ok(phase) -> None:
    """Run one phase of a save; _SaveFailed on every rank if it failed on any (with the first error)."""
    try:
        phase()
        error = None
    except OSError as err:
        error = f"{type(err).__name__}: {err}"
    except dcp.CheckpointException as err:  # DCP's own collection of every rank's failure
        error = one_line(str(err))[:500]
    if _distributed():
        errors: list[str | None] = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
        error = next((f"rank {rank}: {e}" for rank, e in enumerate(errors) if e is not None), None)
    if error is not None:
        raise _SaveFailed(error)


def _write_metadata(tmp: Path, step: int, state: dict, cfg: RunConfig, tokenizer_path: Path) -> None:
    """trainer_state.json, config.yaml, tokenizer.json, then the manifest of every file (rank 0)."""
    (tmp / TRAINER_STATE).write_text(json.dumps(state, indent=1))
    save_config(cfg, tmp / "config.yaml")
    shutil.copyfile(tokenizer_path, tmp / "tokenizer.json")
    fault("checkpoint.before_manifest", step)
    files = {
        str(p.relative_to(tmp)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(tmp.rglob("*"))
        if p.is_file()
    }
    manifest = {"format": FORMAT_VERSION, "step": step, "config_sha256": config_sha256(cfg), "files": files}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    _fsync_tree(tmp)


def _publish(tmp: Path, final: Path, step: int) -> None:
    """Rename the complete temporary directory into place (rank 0)."""
    fault("checkpoint.before_rename", step)
    if final.exists():  # the same step written again (a run resumed at its last step)
        old = final.parent / f".{final.name}.old"  # absent: recover_interrupted_save ran in prepare
        os.replace(final, old)
        fault("checkpoint.during_rename", step)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    _fsync_dir(final.parent)  # the rename itself survives a power loss
    fault("checkpoint.after_rename", step)


def recover_interrupted_save(root: Path) -> None:
    """Undo what a death between the two renames of a re-save leaves: `.step_N.old` without
    `step_N` is the valid checkpoint moved aside; put it back. Temporary directories are removed."""
    for old in root.glob(".step_*.old"):
        final = root / old.name[1:].removesuffix(".old")
        if final.exists():
            shutil.rmtree(old)
        else:
            os.replace(old, final)
    for tmp in root.glob(".step_*.tmp"):
        shutil.rmtree(tmp, ignore_errors=True)


def _prune(root: Path, keep_last: int) -> None:
    complete = sorted(p for p in root.glob("step_*") if (p / MANIFEST).is_file())
    for old in complete[:-keep_last]:
        shutil.rmtree(old)


# ---------------------------------------------------------------------------- find, verify, load


def load_trainer_state(ckpt_dir: Path) -> dict:
    """The JSON trainer state; anything else there (a pickle, say) is refused without being run."""
    path = ckpt_dir / TRAINER_STATE
    try:
        state = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(
            f"trainer state {path} is not a JSON file ({type(err).__name__}: {one_line(str(err))[:120]})"
        ) from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CheckpointError(f"trainer state {path} has no integer 'step'")
    for key, kind in (("rng", dict), ("optimizer", dict), ("loader", dict)):
        if not isinstance(state.get(key), kind):
            raise CheckpointError(f"trainer state {path} has no '{key}' mapping")
    if not isinstance(state["optimizer"].get("scalars"), dict) or not isinstance(
        state["rng"].get("torch"), str
    ):
        raise CheckpointError(f"trainer state {path} lacks 'optimizer.scalars' or 'rng.torch'")
    return state


def load_checkpoint(
    ckpt_dir: Path,
    parts: nn.Module | list[nn.Module],
    optimizers: torch.optim.Optimizer | list[torch.optim.Optimizer],
) -> dict:
    """Restore model (or pipeline stages) and optimizers in place, under any layout; return the trainer state."""
    parts = parts if isinstance(parts, list) else [parts]
    optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
    state = load_trainer_state(ckpt_dir)
    load_model_weights(parts, ckpt_dir / "model")
    saved_tensors = tensor_headers(ckpt_dir / "optimizer")
    saved_scalars = state["optimizer"]["scalars"]
    # A scalar saved by rank 0 for one parameter (Adam's `step`) is the same for all of them.
    any_scalar = {key.rsplit(".", 1)[1]: value for key, value in saved_scalars.items()}
    for part, optimizer in zip(parts, optimizers, strict=True):
        flat, rest = _optimizer_state(part, optimizer)  # this layout's template
        missing = sorted(set(flat) - set(saved_tensors))
        if missing:
            raise CheckpointError(
                f"checkpoint {ckpt_dir / 'optimizer'} lacks tensor '{missing[0]}' (another optimizer?)"
            )
        if flat:
            load_tensors(flat, ckpt_dir / "optimizer")
        unalias = {v: k for k, v in head_alias(part).items()}
        per_param: dict[str, dict] = {}
        for key, value in [
            *flat.items(),
            *((k, saved_scalars.get(k, any_scalar.get(k.rsplit(".", 1)[1]))) for k in rest["scalars"]),
        ]:
            fqn, name = key.removeprefix("state.").rsplit(".", 1)
            per_param.setdefault(unalias.get(fqn, fqn), {})[name] = _from_json(value)
        # Hyper-parameters come from this run's optimizer (the LR is set every step anyway).
        optim_state = cast("OptimizerStateType", {"state": per_param, "param_groups": rest["param_groups"]})
        set_optimizer_state_dict(part, optimizer, optim_state)
    set_rng_state(state["rng"])
    return state

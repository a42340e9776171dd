"""The processes of a training run: the process group's lifetime, rank-0 work, cross-rank means.

Every training command runs inside `process_group(...)`: under torchrun it initialises
torch.distributed, turns a collective that failed because a peer died into one clear error line,
and tears the group down safely; in a single process it does nothing.
"""

from __future__ import annotations

import contextlib
import gc
import re
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch
import torch.distributed as dist

from lmforge.errors import LmforgeError, report
from lmforge.parallel.mesh import ParallelDims, init_distributed

T = TypeVar("T")


@contextlib.contextmanager
def process_group(dims: ParallelDims, device: torch.device, timeout_s: int) -> Iterator[None]:
    """Initialise torch.distributed for a distributed layout; on the way out, wait for every rank
    (after success), then destroy the groups. A collective that timed out or lost a peer becomes an
    LmforgeError naming the rank and parallel.timeout_s."""
    if dims.distributed:
        init_distributed(device, timeout_s)
    try:
        yield
        if dims.distributed:
            dist.barrier()  # no rank tears its process group down while another still talks to it
    except LmforgeError as err:
        if dims.distributed and err.every_rank:
            # torchrun stops the other workers as soon as one exits non-zero: each rank prints its
            # line before any of them leaves this barrier, or a slower rank's line is lost
            report(err)
            with contextlib.suppress(RuntimeError):  # a peer died meanwhile: the line is out already
                dist.barrier()
        raise
    except RuntimeError as err:  # gloo/NCCL errors are RuntimeErrors (DistBackendError among them)
        if dims.distributed and _peer_failure(err):
            raise LmforgeError(
                f"rank {dist.get_rank()}: a collective failed ({_first_sentence(err)}): another rank died "
                f"or stopped answering for parallel.timeout_s={timeout_s}s"
            ) from err
        raise
    finally:
        if dist.is_initialized():
            # Destroy the process groups while the interpreter is fully alive: collect the reference
            # cycles that still hold one (DDP's reducer, the device mesh) now, not at interpreter
            # teardown, where a gloo worker thread releasing a tensor needs a GIL that is gone and the
            # process aborts ("terminate called without an active exception", seen once in CI).
            gc.collect()
            dist.destroy_process_group()
            gc.collect()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def on_rank0(fn: Callable[..., T], *args: object) -> T:
    """Run fn on rank 0 only (file writes, data preparation, checksums) and give every rank its
    result; the others wait, and raise its error too."""
    if not dist.is_initialized():
        return fn(*args)
    outcome: list = [None, None, False]  # [error, result, the error is an LmforgeError]
    failure = None
    if dist.get_rank() == 0:
        try:
            outcome[1] = fn(*args)
        except LmforgeError as err:
            outcome[0], outcome[2] = str(err), True
        except Exception as err:  # a bug or an OSError: the others must not wait for the timeout
            failure = err
            outcome[0] = f"{type(err).__name__}: {err}"
    dist.broadcast_object_list(outcome, src=0)
    if failure is not None:
        raise failure
    if outcome[0] is not None:
        message = outcome[0] if dist.get_rank() == 0 else f"rank 0 failed: {outcome[0]}"
        raise LmforgeError(message, every_rank=outcome[2])
    return outcome[1]


def global_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean over all ranks (gloo has no AVG reduction, so sum and divide)."""
    if dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value


def _peer_failure(err: BaseException) -> bool:
    """A collective that timed out or lost a peer (rather than a bug on this rank)."""
    text = str(err).lower()
    return isinstance(err, dist.DistError) or any(
        word in text
        for word in ("timed out", "timeout", "connection closed", "connection reset", "broken pipe")
    )


def _first_sentence(err: BaseException) -> str:
    """'Connection closed by peer [127.0.0.1]:4505' of a gloo/NCCL error, without its source location."""
    text = re.sub(r"\[[^\]]*\.(?:cc|cpp|h):\d+\]\s*", "", str(err).strip().splitlines()[0])
    return text.split(". ")[0].rstrip(".")

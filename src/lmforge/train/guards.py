"""What keeps a run alive through bad steps and preemption.

- `StopSignal`: SIGTERM (a scheduler's preemption) or SIGINT (Ctrl-C) asks the loop to write a
  checkpoint at the next step boundary and exit 0; a second SIGINT interrupts at once.
- `step_flags`: whether this step's loss or gradient norm is non-finite and whether a stop was
  requested, agreed by every rank in one two-number all-reduce, left on the device; the loop reads
  them on the host every `train.check_every` steps. With a fused Adam/AdamW, `skip_on_device`
  skips a non-finite step's update without waiting for that read.
- `NonFiniteGuard`: a non-finite step is skipped (no optimizer step, its state untouched); after
  `train.nonfinite_patience` of them in a row the run rolls back to its last checkpoint (the LR
  scaled by `train.rollback_lr_factor`) or stops, as `train.nonfinite_action` says.

Rolling back keeps the data loader where it is: the batches that led to the bad steps are not
replayed. PaLM (Chowdhery et al. 2022, section 5.1) handled its loss spikes the same way,
restarting from an earlier checkpoint and skipping the data batches around the spike.
"""

from __future__ import annotations

import signal
import threading

import torch
import torch.distributed as dist

from lmforge.config import TrainConfig
from lmforge.errors import LmforgeError


class StopSignal:
    """Context manager: while active, SIGTERM/SIGINT set `requested` (the signal's name) instead of
    killing the process. Outside the main thread (signals cannot be caught there) it does nothing."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict = {}

    def _handle(self, signum: int, frame) -> None:
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: the user does not want to wait
        self.requested = signal.Signals(signum).name

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


def step_flags(
    loss: torch.Tensor, grad_norm: torch.Tensor, stop_requested: bool, check_grad: bool
) -> torch.Tensor:
    """(2,) float tensor on the device: [non-finite, stop] for this step, the same on every rank.
    grad_norm: a plain tensor (the full value of a DTensor norm).

    A NaN on one rank reaches every rank's gradients through the gradient reduction, but its loss
    stays local, and a signal may reach one rank only: hence the all-reduce (MAX) of both flags.
    Nothing here waits for the device (with NCCL the all-reduce is queued like a kernel); reading
    the flags on the host is the sync, done every `train.check_every` steps (`read_flags` in lmforge.train.loop).
    """
    bad = ~torch.isfinite(loss)
    if check_grad:
        bad = bad | ~torch.isfinite(grad_norm)
    # torch.full, not torch.tensor: a Python number copied to a GPU waits for the queued work.
    flags = torch.stack([bad.float(), torch.full((), float(stop_requested), device=loss.device)])
    if dist.is_initialized():
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return flags


def skip_on_device(optimizers: list[torch.optim.Optimizer], flags: torch.Tensor) -> None:
    """Step the optimizers, which leave parameters, moments and step counts untouched where
    flags[0] is 1: the fused Adam/AdamW kernels read `found_inf` on the device, as they do for
    torch.amp.GradScaler, so the decision needs no host sync."""
    # `found_inf` is an attribute the fused kernels read (getattr) that Optimizer's type does not
    # declare; torch.amp.GradScaler sets it the same way, with the same ignores. 0-dim, like the
    # step counts it is subtracted from.
    for optimizer in optimizers:
        optimizer.found_inf = flags[0]  # type: ignore[attr-defined]
        optimizer.step()
        del optimizer.found_inf  # type: ignore[attr-defined]
        optimizer.zero_grad(set_to_none=True)


def supports_skip_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """A fused Adam/AdamW (not Muon's subclass, whose Muon groups have no fused kernel)."""
    return type(optimizer) in (torch.optim.Adam, torch.optim.AdamW) and all(
        group.get("fused") for group in optimizer.param_groups
    )


class NonFiniteGuard:
    """Counts non-finite steps and decides what the loop does about them."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.consecutive = 0
        self.total = 0  # non-finite steps over the whole run (kept across resumes)
        self.rollbacks = 0
        self.lr_scale = 1.0

    def record(self, step: int, bad: bool) -> str | None:
        """None for a good step, else what bad_step says."""
        if not bad:
            self.consecutive = 0
            return None
        return self.bad_step(step)

    def bad_step(self, step: int) -> str:
        """'skip', or 'rollback' when patience ran out; raises LmforgeError when the run must stop."""
        self.consecutive += 1
        self.total += 1
        if self.consecutive < self.cfg.nonfinite_patience:
            return "skip"
        what = (
            f"{self.consecutive} consecutive steps (up to step {step}) had a non-finite loss or gradient norm"
        )
        if self.cfg.nonfinite_action == "stop":
            raise LmforgeError(f"training stopped: {what} (train.nonfinite_action is 'stop')")
        if self.rollbacks >= self.cfg.max_rollbacks:
            raise LmforgeError(
                f"training stopped: {what} after {self.rollbacks} rollbacks (train.max_rollbacks)"
            )
        self.rollbacks += 1
        self.consecutive = 0
        self.lr_scale *= self.cfg.rollback_lr_factor
        return "rollback"

    def state_dict(self) -> dict:
        return {"nonfinite_steps": self.total, "consecutive": self.consecutive, "rollbacks": self.rollbacks,
                "lr_scale": self.lr_scale}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        self.total = int(state.get("nonfinite_steps", 0))
        self.consecutive = int(state.get("consecutive", 0))
        self.rollbacks = int(state.get("rollbacks", 0))
        self.lr_scale = float(state.get("lr_scale", 1.0))

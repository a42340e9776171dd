"""The one training loop, for every objective and every layout.

`train(run)` steps until train.max_steps: learning rate from the schedule, this rank's
micro-batches from the objective, forward/backward/clip/update through the TrainStep, the
non-finite and stop flags (read on the host every train.check_every steps), logging,
evaluation, checkpoints, rollback after a streak of non-finite steps, and a clean exit on
SIGTERM/SIGINT. What differs between kinds of training is the objective's
(lmforge.train.objective); how the model is built and wrapped is the caller's (e.g.
lmforge.train.pretrain). The helpers below take what they use as arguments.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lmforge.config import RunConfig
from lmforge.errors import ConfigError, LmforgeError
from lmforge.faults import fault
from lmforge.rundir import latest_checkpoint, list_checkpoints
from lmforge.runtime import synchronize
from lmforge.train.checkpoint import load_checkpoint, save_checkpoint
from lmforge.train.distributed import global_mean, on_rank0
from lmforge.train.guards import NonFiniteGuard, StopSignal, step_flags, supports_skip_on_device
from lmforge.train.metrics import BatchLog, MetricsLogger
from lmforge.train.objective import Objective
from lmforge.train.schedule import lr_at
from lmforge.train.step import TrainStep


@dataclass
class TrainingRun:
    """What the loop runs: everything built before the first step."""

    cfg: RunConfig  # the loop reads train, schedule, optim.lr, logging, checkpoint; checkpoints save it all
    run_dir: Path
    step: TrainStep
    objective: Objective
    log: MetricsLogger
    batch_log: BatchLog
    guard: NonFiniteGuard
    stop_signal: StopSignal
    start_step: int
    accum_steps: int  # micro-batches per rank per optimizer step
    tokens_per_step: int  # global
    flops_per_token: int
    peak_flops: float | None  # of all ranks together
    check_every: int


@dataclass
class Progress:
    """The loop's own state between steps."""

    step: int
    max_steps: int
    pending: list[torch.Tensor] = field(default_factory=list)  # step_flags not read on the host yet
    last_eval: dict = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)
    last_log_time: float = 0.0
    last_log_step: int = 0
    paused_s: float = 0.0  # time spent evaluating and checkpointing
    eval_s: float = 0.0  # evaluating (and the samples printed with each evaluation)
    checkpoint_s: float = 0.0  # writing checkpoints

    def __post_init__(self) -> None:
        self.last_log_time, self.last_log_step = self.started, self.step


def train(run: TrainingRun) -> dict:
    """Train; return the last evaluation ({"step", "val_loss", ..., "train_time_s"}) with the seconds
    spent evaluating and checkpointing ("eval_time_s", "checkpoint_time_s"), or {"step", "stopped_by"}
    when a stop signal ended the run after a checkpoint."""
    cfg, step_fn, objective, log = run.cfg, run.step, run.objective, run.log
    p = Progress(run.start_step, cfg.train.max_steps)
    while p.step < p.max_steps:
        lr = lr_at(p.step, cfg.schedule, cfg.optim.lr, cfg.schedule_steps) * run.guard.lr_scale
        step_fn.set_lr(lr)
        batches = [run.batch_log.record(p.step + 1, objective.next_batch()) for _ in range(run.accum_steps)]
        loss, grad_norm = step_fn.forward_backward(batches, objective.loss, p.step + 1, objective.by_targets)
        # With fp16 the GradScaler skips overflowing steps itself; a non-finite loss is ours to handle.
        stop_requested = run.stop_signal.requested is not None
        p.pending.append(step_flags(loss, grad_norm, stop_requested, not step_fn.scaler.is_enabled()))
        bad = stop = roll_back = False  # known for this step once its flags are read
        if run.check_every == 1:  # decide on the host: one sync per step
            bad, stop, roll_back = read_flags(p, p.step + 1, run.guard, log)
            step_fn.update(skip=bad)
        else:  # the fused optimizer skips a non-finite step on the device; the host reads the flags later
            step_fn.update(skip=p.pending[-1])
        p.step += 1
        log.advance()
        fault("train.step", p.step)
        logging_step = p.step % cfg.logging.log_every == 0 or p.step == p.max_steps
        eval_step = cfg.train.eval_every and p.step % cfg.train.eval_every == 0 and p.step != p.max_steps
        periodic = cfg.checkpoint.every_steps and p.step % cfg.checkpoint.every_steps == 0
        if run.check_every > 1 and (p.step % run.check_every == 0 or logging_step or eval_step or periodic):
            bad, stop, roll_back = read_flags(p, p.step, run.guard, log)
        if roll_back:
            p.step = p.last_log_step = rollback(run, p.step)
            continue
        if not bad and logging_step:
            log_train_step(run, p, loss, grad_norm, lr)
        paused_at = time.perf_counter()  # evaluation and checkpoints do not count towards tokens/s
        if eval_step and not stop:
            p.last_eval = evaluate(run, p)
            if reached_target(cfg.train.target_val_loss, p.last_eval, log):
                p.max_steps = p.step  # the end-of-run checkpoint follows; the evaluation is not repeated
        if p.step != p.max_steps and (periodic or stop):
            timed_save(run, p)
        if stop and p.step != p.max_steps:  # preempted: the checkpoint is written, exit cleanly
            return stopped(run, p.step)
        p.last_log_time += time.perf_counter() - paused_at
        p.paused_s += time.perf_counter() - paused_at
    if p.last_eval.get("step") != p.step:
        p.last_eval = evaluate(run, p)
    timed_save(run, p)
    return {**p.last_eval, "eval_time_s": p.eval_s, "checkpoint_time_s": p.checkpoint_s}


def read_flags(
    p: Progress, at_step: int, guard: NonFiniteGuard, log: MetricsLogger
) -> tuple[bool, bool, bool]:
    """Read the flags of the steps since the last read (a host sync) and let the guard count them:
    (the last step non-finite, a stop requested, roll back). Raises when the guard says stop."""
    rows = torch.stack(p.pending).tolist()
    p.pending.clear()
    for index, (bad_flag, _) in enumerate(rows):
        bad_at = at_step - len(rows) + 1 + index
        action = guard.record(bad_at, bad_flag > 0)
        if action is not None:
            log.event(
                {"step": bad_at, "event": "nonfinite", "action": action, "nonfinite_steps": guard.total}
            )
        if action == "rollback":  # the steps after it are undone by the rollback
            return True, False, True
    return rows[-1][0] > 0, any(stop_flag > 0 for _, stop_flag in rows), False


def log_train_step(
    run: TrainingRun, p: Progress, loss: torch.Tensor, grad_norm: torch.Tensor, lr: float
) -> None:
    # Host syncs: the flags (every train.check_every steps), .item() on logging steps only.
    loss_value, grad_norm_value = global_mean(loss).item(), grad_norm.item()
    synchronize(run.step.device)
    now = time.perf_counter()
    tokens_per_sec = run.tokens_per_step * (p.step - p.last_log_step) / (now - p.last_log_time)
    run.log.log_train({
        "step": p.step,
        "loss": loss_value,
        "lr": lr,
        "grad_norm": grad_norm_value,
        "tokens_per_sec": tokens_per_sec,
        "mfu": run.flops_per_token * tokens_per_sec / run.peak_flops if run.peak_flops else None,
        "elapsed_s": now - p.started,
        "nonfinite_steps": run.guard.total,
    })  # fmt: skip
    p.last_log_time, p.last_log_step = now, p.step


def evaluate(run: TrainingRun, p: Progress) -> dict:
    # Seconds this process spent training before this evaluation (evaluations and checkpoints left
    # out): the clock of time-to-loss comparisons.
    started = time.perf_counter()
    train_clock = started - p.started - p.paused_s
    record = {"step": p.step, **run.objective.evaluate(run.step), "train_time_s": train_clock}
    run.log.log_eval(record)
    for line in run.objective.samples(run.step, p.step):
        run.log.print(line)
    p.eval_s += time.perf_counter() - started
    return record


def reached_target(target: float | None, record: dict, log: MetricsLogger) -> bool:
    """Whether the evaluation reached train.target_val_loss (then logged as an event)."""
    if target is None or record["val_loss"] > target:
        return False
    log.event({"step": record["step"], "event": "target_reached", "val_loss": record["val_loss"],
               "target_val_loss": target, "train_time_s": record["train_time_s"]})  # fmt: skip
    log.print(
        f"step {record['step']}: validation loss {record['val_loss']:.4f} <= train.target_val_loss {target}"
    )
    return True


def timed_save(run: TrainingRun, p: Progress) -> None:
    started = time.perf_counter()
    save(run, p.step)
    p.checkpoint_s += time.perf_counter() - started


def save(run: TrainingRun, at_step: int) -> None:
    if not run.cfg.checkpoint.enabled:
        return
    objective_state = run.objective.state_dict()
    taken = set(objective_state) & {"step", "guard", "grad_scaler", "rng", "optimizer"}
    assert not taken, f"the objective's state uses the trainer state's own keys {sorted(taken)}"
    trainer_state = {
        **objective_state,
        "guard": run.guard.state_dict(),
        "grad_scaler": run.step.scaler.state_dict(),
    }
    save_checkpoint(run.run_dir, at_step, run.step.parts, run.step.optimizers, trainer_state, run.cfg,
                    run.run_dir / "tokenizer.json", run.cfg.checkpoint.keep_last)  # fmt: skip


def restore(ckpt_dir: Path, step: TrainStep, objective: Objective, guard: NonFiniteGuard) -> int:
    """Load a checkpoint into the step's model(s) and optimizers, the objective (its data position)
    and the guard; returns its step."""
    state = load_checkpoint(ckpt_dir, step.parts, step.optimizers)
    objective.load_state_dict(state)
    guard.load_state_dict(state.get("guard", {}))
    if state.get("grad_scaler"):  # fp16: the loss scale continues where it was
        step.scaler.load_state_dict(state["grad_scaler"])
    return state["step"]


def rollback(run: TrainingRun, at_step: int) -> int:
    """Reload the last checkpoint's model and optimizer (not its data position); its step."""
    ckpt = on_rank0(latest_checkpoint, run.run_dir) if list_checkpoints(run.run_dir) else None
    if ckpt is None:
        raise LmforgeError("training stopped: non-finite steps and no checkpoint to roll back to")
    restored = load_checkpoint(ckpt, run.step.parts, run.step.optimizers)["step"]
    run.log.event({"step": at_step, "event": "rollback", "to_step": restored, "lr_scale": run.guard.lr_scale})
    run.log.print(f"step {at_step}: {run.cfg.train.nonfinite_patience} non-finite steps in a row, rolled back to "
                  f"{ckpt.name} with the learning rate scaled by {run.guard.lr_scale:g}")  # fmt: skip
    return restored


def stopped(run: TrainingRun, at_step: int) -> dict:
    requested = run.stop_signal.requested
    outcome = (
        f"checkpoint written at step {at_step}, stopping; continue with --resume"
        if run.cfg.checkpoint.enabled
        else f"stopping at step {at_step} (checkpoint.enabled=false: nothing to resume from)"
    )
    run.log.print(f"{requested or 'another rank'}: {outcome}")
    return {"step": at_step, "stopped_by": requested or "another rank's signal"}


def resolve_check_every(cfg: RunConfig, step: TrainStep) -> int:
    """train.check_every, resolved: steps between host reads of the non-finite and stop flags."""
    can_defer = all(supports_skip_on_device(o) for o in step.optimizers) and not step.scaler.is_enabled()
    if cfg.train.check_every is None:
        # At most 10: a stop signal is acted on at the next read, within a scheduler's grace period.
        return min(cfg.logging.log_every, 10) if can_defer else 1
    if cfg.train.check_every > 1 and not can_defer:
        raise ConfigError(
            f"config key 'train.check_every' is {cfg.train.check_every}, but skipping a non-finite step "
            f"without a host sync needs a fused Adam/AdamW (optim.name adamw or adam, optim.fused true) "
            f"and no fp16 GradScaler; got optim.name {cfg.optim.name!r}, optim.fused {cfg.optim.fused}"
        )
    return cfg.train.check_every

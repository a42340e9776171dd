"""NaN/Inf in the loss or the gradients (point 9): skipped on every rank, counted, rolled back or
stopped after a streak; a rollback's lower LR kept across a stop and resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from common import checkpoint_dir, error_lines, losses, pretrain_args, records, run, tensors
from torch import nn

from lmforge import faults
from lmforge.config import load_config
from lmforge.rundir import latest_checkpoint
from lmforge.train.schedule import lr_at
from lmforge.train.step import TrainStep

DDP = ("--train.micro_batch_size=4",)


def adam_step(ckpt) -> float:
    scalars = json.loads((ckpt / "trainer_state.json").read_text())["optimizer"]["scalars"]
    return {value["tensor"] for key, value in scalars.items() if key.endswith(".step")}.pop()


def assert_finite(ckpt) -> None:
    for name, tensor in {**tensors(ckpt / "model"), **tensors(ckpt / "optimizer")}.items():
        assert torch.isfinite(tensor).all(), name


@pytest.mark.parametrize(
    "point",
    # train.loss: NaN before backward (the gradients of every rank turn NaN through the all-reduce);
    # train.loss_value: only rank 1's loss value, its gradients finite: only the flags' all-reduce
    # tells rank 0, which writes metrics.jsonl and the checkpoints.
    ["train.loss", "train.loss_value"],
)
def test_a_nan_on_one_rank_skips_the_step_on_every_rank(point, prepared_dir, tmp_path):
    out = tmp_path / "run"
    args = pretrain_args(prepared_dir, out, *DDP, steps=5, every=1)
    result = run(args, tmp_path, nproc=2, fault=f"{point}:nan@step=3,rank=1")
    assert result.returncode == 0, result.stderr[-3000:]

    # Rank 0 writes metrics.jsonl and its own loss was finite: it learnt of rank 1's NaN.
    events = [r for r in records(out) if "event" in r]
    assert events == [{"step": 3, "event": "nonfinite", "action": "skip", "nonfinite_steps": 1}]
    train = {r["step"]: r for r in records(out) if "loss" in r}
    assert sorted(train) == [1, 2, 4, 5] and train[5]["nonfinite_steps"] == 1
    # The skipped step left weights and optimizer state exactly as step 2 had them.
    before, after = checkpoint_dir(out, 2), checkpoint_dir(out, 3)
    assert_same_state(before, after)
    assert adam_step(after) == 2 and adam_step(checkpoint_dir(out, 5)) == 4
    assert_finite(checkpoint_dir(out, 5))


def assert_same_state(before: Path, after: Path) -> None:
    """Two checkpoints hold the same weights and optimizer state, bit for bit (a skipped step)."""
    for kind in ("model", "optimizer"):
        old, new = tensors(before / kind), tensors(after / kind)
        assert old.keys() == new.keys() and all(torch.equal(old[k], new[k]) for k in old), kind


ROLLBACK = ("--train.nonfinite_patience=3", "--train.rollback_lr_factor=0.5")
ROLLBACK_FAULT = "train.loss:nan@step=5-7"  # checkpoints at 4, 8 and 12: rolled back to step 4 at step 7


@pytest.fixture(scope="module")
def rolled_back(prepared_dir, tmp_path_factory):
    """A 12-step run that rolls back after the NaN steps 5-7, uninterrupted: (run directory, result)."""
    out = tmp_path_factory.mktemp("rolled_back") / "run"
    result = run(pretrain_args(prepared_dir, out, *ROLLBACK, steps=12), out.parent, fault=ROLLBACK_FAULT)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


def test_a_streak_of_bad_steps_rolls_back_with_a_lower_lr(rolled_back):
    out, result = rolled_back
    assert "rolled back to step_0000004" in result.stdout

    events = [r for r in records(out) if "event" in r]
    assert [(e["step"], e["action"]) for e in events if e["event"] == "nonfinite"] == [
        (5, "skip"), (6, "skip"), (7, "rollback")]  # fmt: skip
    assert {"step": 7, "event": "rollback", "to_step": 4, "lr_scale": 0.5} in events
    cfg = load_config(out / "config.yaml")
    retrained = [r for r in records(out) if "loss" in r and r["step"] == 5]
    assert len(retrained) == 1  # the bad step 5 has no loss record; step 5 after the rollback has
    assert math.isclose(retrained[0]["lr"], 0.5 * lr_at(4, cfg.schedule, cfg.optim.lr, cfg.schedule_steps))
    final = checkpoint_dir(out, 12)
    assert json.loads((final / "trainer_state.json").read_text())["guard"] == {
        "nonfinite_steps": 3, "consecutive": 0, "rollbacks": 1, "lr_scale": 0.5}  # fmt: skip
    assert adam_step(final) == 4 + 8  # steps 1-4, then 5-12 again after the rollback; the 3 bad ones none
    assert_finite(final)


def test_a_resumed_run_keeps_the_lower_lr_of_its_rollback(prepared_dir, rolled_back, tmp_path):
    """The guard's state (its LR scale, its counts) is part of the checkpoint and restored on resume."""
    straight, _ = rolled_back
    out = tmp_path / "run"
    args = pretrain_args(prepared_dir, out, *ROLLBACK, steps=12)
    faults = f"{ROLLBACK_FAULT};train.step:term@step=8"  # after the rollback: steps 5-7 again, then 8
    stopped = run(args, tmp_path, fault=faults)
    assert stopped.returncode == 0 and "rolled back to step_0000004" in stopped.stdout, stopped.stderr[-3000:]
    assert latest_checkpoint(out) == checkpoint_dir(out, 9)  # the boundary after the signal
    resumed = run([*args, "--resume"], tmp_path, fault=faults)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    def lr_by_step(run_dir):
        return {r["step"]: r["lr"] for r in records(run_dir) if "loss" in r}

    assert lr_by_step(out) == lr_by_step(straight)  # 0.5 x the schedule from step 5 on, steps 10-12 too
    assert losses(out) == losses(straight)


def test_an_infinite_gradient_with_a_finite_loss_skips_the_step(prepared_dir, tmp_path):
    """The loss check alone does not see it: only the gradient norm is non-finite."""
    out = tmp_path / "run"
    args = pretrain_args(prepared_dir, out, "--train.check_every=1", steps=4, every=1)
    result = run(args, tmp_path, fault="train.grad:nan@step=3")
    assert result.returncode == 0, result.stderr[-3000:]

    events = [r for r in records(out) if "event" in r]
    assert events == [{"step": 3, "event": "nonfinite", "action": "skip", "nonfinite_steps": 1}]
    assert sorted(losses(out)) == [1, 2, 4]
    before, after = checkpoint_dir(out, 2), checkpoint_dir(out, 3)
    assert_same_state(before, after)
    assert adam_step(after) == 2 and adam_step(checkpoint_dir(out, 4)) == 3
    assert_finite(checkpoint_dir(out, 4))


def test_the_grad_fault_leaves_the_loss_finite(monkeypatch):
    """What train.grad:nan does to a step: an infinite gradient norm, a finite loss."""
    model = nn.Linear(4, 1)
    step = TrainStep(model, model, [torch.optim.AdamW(model.parameters())], torch.device("cpu"),
                     torch.float32, grad_clip=1.0)  # fmt: skip
    batch = (torch.randn(2, 4), torch.randn(2, 1))
    monkeypatch.setenv("LMFORGE_FAULT", "train.grad:nan@step=3")
    monkeypatch.setattr(faults, "_parsed", ("", []))  # fires once per step and process: parse afresh
    for step_number, finite_norm in ((2, True), (3, False)):
        loss, grad_norm = step.forward_backward([batch], mse, step_number)
        assert torch.isfinite(loss) and bool(torch.isfinite(grad_norm)) == finite_norm
        step.update(skip=not finite_norm)


def mse(module: nn.Module, batch) -> torch.Tensor:
    inputs, targets = batch
    return nn.functional.mse_loss(module(inputs), targets)


def test_a_good_step_between_bad_ones_ends_the_streak(prepared_dir, tmp_path):
    """NaN at steps 3, 5 and 7 with a patience of 3: three skips, no rollback (5-7 in a row roll
    back: test_a_streak_of_bad_steps_rolls_back_with_a_lower_lr)."""
    out = tmp_path / "run"
    args = pretrain_args(prepared_dir, out, "--train.nonfinite_patience=3", steps=8)
    result = run(args, tmp_path, fault=";".join(f"train.loss:nan@step={n}" for n in (3, 5, 7)))
    assert result.returncode == 0, result.stderr[-3000:]
    assert [r for r in records(out) if "event" in r] == [
        {"step": step, "event": "nonfinite", "action": "skip", "nonfinite_steps": count}
        for count, step in enumerate((3, 5, 7), start=1)
    ]
    assert json.loads((checkpoint_dir(out, 8) / "trainer_state.json").read_text())["guard"] == {
        "nonfinite_steps": 3, "consecutive": 0, "rollbacks": 0, "lr_scale": 1.0}  # fmt: skip


def test_a_streak_of_bad_steps_stops_the_run_when_asked(prepared_dir, tmp_path):
    out = tmp_path / "run"
    args = pretrain_args(prepared_dir, out, "--train.nonfinite_action=stop", steps=10)
    result = run(args, tmp_path, fault="train.loss:nan@step=5-7")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    [line] = error_lines(result)
    assert "3 consecutive steps (up to step 7)" in line and "nonfinite_action" in line
    assert_finite(checkpoint_dir(out, 4))

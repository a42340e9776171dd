"""NaN/Inf in the loss (point 9): skipped on every rank, counted, rolled back or stopped after a streak."""

from __future__ import annotations

import json
import math

import pytest
import torch
from common import checkpoint_dir, error_lines, pretrain_args, records, run, tensors

from lmforge.config import load_config
from lmforge.train.schedule import lr_at

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
    for kind in ("model", "optimizer"):
        old, new = tensors(before / kind), tensors(after / kind)
        assert old.keys() == new.keys() and all(torch.equal(old[k], new[k]) for k in old), kind
    assert adam_step(after) == 2 and adam_step(checkpoint_dir(out, 5)) == 4
    assert_finite(checkpoint_dir(out, 5))


def test_a_streak_of_bad_steps_rolls_back_with_a_lower_lr(prepared_dir, tmp_path):
    out = tmp_path / "run"
    args = pretrain_args(
        prepared_dir, out, "--train.nonfinite_patience=3", "--train.rollback_lr_factor=0.5", steps=10
    )
    result = run(args, tmp_path, fault="train.loss:nan@step=5-7")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rolled back to step_0000004" in result.stdout

    events = [r for r in records(out) if "event" in r]
    assert [(e["step"], e["action"]) for e in events if e["event"] == "nonfinite"] == [
        (5, "skip"), (6, "skip"), (7, "rollback")]  # fmt: skip
    assert {"step": 7, "event": "rollback", "to_step": 4, "lr_scale": 0.5} in events
    cfg = load_config(out / "config.yaml")
    retrained = [r for r in records(out) if "loss" in r and r["step"] == 5]
    assert len(retrained) == 1  # the bad step 5 has no loss record; step 5 after the rollback has
    assert math.isclose(retrained[0]["lr"], 0.5 * lr_at(4, cfg.schedule, cfg.optim.lr, cfg.schedule_steps))
    final = checkpoint_dir(out, 10)
    assert json.loads((final / "trainer_state.json").read_text())["guard"] == {
        "nonfinite_steps": 3, "consecutive": 0, "rollbacks": 1, "lr_scale": 0.5}  # fmt: skip
    assert adam_step(final) == 4 + 6  # steps 1-4, then 5-10 again after the rollback; the 3 bad ones none
    assert_finite(final)


def test_a_streak_of_bad_steps_stops_the_run_when_asked(prepared_dir, tmp_path):
    out = tmp_path / "run"
    args = pretrain_args(prepared_dir, out, "--train.nonfinite_action=stop", steps=10)
    result = run(args, tmp_path, fault="train.loss:nan@step=5-7")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    [line] = error_lines(result)
    assert "3 consecutive steps (up to step 7)" in line and "nonfinite_action" in line
    assert_finite(checkpoint_dir(out, 4))

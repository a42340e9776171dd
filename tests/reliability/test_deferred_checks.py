"""train.check_every > 1 (no host sync on most steps): a non-finite step is still skipped, on the
device, by the fused AdamW; the guard and the stop signal act at the next read of the flags."""

from __future__ import annotations

import json

import pytest
import torch
from common import checkpoint_dir, error_lines, losses, pretrain_args, records, run, tensors

FUSED = ("--optim.fused=true", "--logging.log_every=4")


def nonfinite_events(run_dir) -> list[tuple[int, str]]:
    return [(r["step"], r["action"]) for r in records(run_dir) if r.get("event") == "nonfinite"]


def test_deferred_reads_skip_the_same_steps_as_reading_every_step(prepared_dir, tmp_path):
    runs = {}
    for check_every in (1, 4):
        out = tmp_path / f"check_{check_every}"
        args = pretrain_args(
            prepared_dir, out, *FUSED, f"--train.check_every={check_every}", steps=12, every=4
        )
        result = run(args, tmp_path, fault="train.loss:nan@step=6-7")
        assert result.returncode == 0, result.stderr[-3000:]
        runs[check_every] = out
    for out in runs.values():
        assert nonfinite_events(out) == [(6, "skip"), (7, "skip")]
    # Same updates, bit for bit: the device-side skip left the state as the host-side one did.
    assert losses(runs[4]) == losses(runs[1]) and sorted(losses(runs[4])) == [4, 8, 12]
    for step in (8, 12):
        old, new = (
            tensors(checkpoint_dir(runs[1], step) / "model"),
            tensors(checkpoint_dir(runs[4], step) / "model"),
        )
        assert old.keys() == new.keys() and all(torch.equal(old[k], new[k]) for k in old)
    state = json.loads((checkpoint_dir(runs[4], 12) / "trainer_state.json").read_text())
    assert state["guard"]["nonfinite_steps"] == 2


def test_a_deferred_streak_still_rolls_back(prepared_dir, tmp_path):
    out = tmp_path / "run"
    args = pretrain_args(prepared_dir, out, *FUSED, "--train.check_every=4", "--train.nonfinite_patience=3",
                         steps=12, every=4)  # fmt: skip
    result = run(args, tmp_path, fault="train.loss:nan@step=5-7")
    assert result.returncode == 0, result.stderr[-3000:]
    # Read at step 8: the streak 5-7 ran out of patience at 7; step 8 (good) is undone with it.
    assert nonfinite_events(out) == [(5, "skip"), (6, "skip"), (7, "rollback")]
    assert "rolled back to step_0000004" in result.stdout
    state = json.loads((checkpoint_dir(out, 12) / "trainer_state.json").read_text())
    assert state["guard"]["rollbacks"] == 1


def test_a_stop_signal_is_acted_on_at_the_next_read(prepared_dir, tmp_path):
    out = tmp_path / "run"
    args = pretrain_args(prepared_dir, out, *FUSED, "--train.check_every=4", steps=12, every=100)
    result = run(args, tmp_path, fault="train.step:term@step=5")
    assert result.returncode == 0 and '"stopped_by"' in result.stdout, result.stderr[-3000:]
    assert checkpoint_dir(out, 8).is_dir() and not checkpoint_dir(out, 5).exists()


@pytest.mark.parametrize("extra", [("--optim.name=sgd",), ("--optim.fused=false",)])
def test_deferred_reads_need_a_fused_adam(extra, prepared_dir, tmp_path):
    args = pretrain_args(prepared_dir, tmp_path / "run", "--train.check_every=4", *extra, steps=2)
    result = run(args, tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    [line] = error_lines(result)
    assert "train.check_every" in line and "fused" in line

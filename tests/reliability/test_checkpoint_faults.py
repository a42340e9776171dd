"""A checkpoint save that dies, a disk that fills up, a checkpoint that rots (points 1, 5, 12)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from common import checkpoint_dir, error_lines, losses, pretrain_args, run, tensors
from safetensors.torch import save_file

from lmforge.rundir import latest_checkpoint, verify_checkpoint


@pytest.fixture(scope="module")
def straight(prepared_dir, tmp_path_factory) -> Path:
    """8 uninterrupted steps, checkpoints at 4 and 8."""
    out = tmp_path_factory.mktemp("straight") / "run"
    result = run(pretrain_args(prepared_dir, out), out.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def only_checkpoints(run_dir: Path) -> list[str]:
    """Names in RUN/checkpoints (hidden temporary directories included)."""
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


@pytest.mark.parametrize(
    "point", ["checkpoint.mid_shard", "checkpoint.before_manifest", "checkpoint.before_rename"]
)
def test_sigkill_during_save_keeps_the_previous_checkpoint(point, prepared_dir, straight, tmp_path):
    out = tmp_path / "run"
    killed = run(pretrain_args(prepared_dir, out), tmp_path, fault=f"{point}:kill@step=8")
    assert killed.returncode == -9, killed.stderr[-2000:]  # really SIGKILLed, mid-save of step 8
    assert "step_0000008" not in only_checkpoints(out)
    assert latest_checkpoint(out).name == "step_0000004"

    resumed = run([*pretrain_args(prepared_dir, out), "--resume"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout and "step_0000004" in resumed.stdout
    assert losses(out) == losses(straight)  # step for step, bit for bit
    assert only_checkpoints(out) == ["step_0000004", "step_0000008"]  # the dead save's leftovers are gone


def test_sigkill_after_rename_leaves_a_valid_new_checkpoint(prepared_dir, straight, tmp_path):
    out = tmp_path / "run"
    killed = run(pretrain_args(prepared_dir, out), tmp_path, fault="checkpoint.after_rename:kill@step=8")
    assert killed.returncode == -9
    verify_checkpoint(checkpoint_dir(out, 8))
    for name, tensor in tensors(checkpoint_dir(out, 8) / "model").items():
        assert torch.equal(tensor, tensors(checkpoint_dir(straight, 8) / "model")[name]), name


def test_sigkill_between_the_renames_of_a_resave_loses_nothing(prepared_dir, straight, tmp_path):
    """Resuming a finished run saves its last step again: old moved aside, new moved in. A death
    between the two renames leaves only the hidden old copy; the next start puts it back."""
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    killed = run(
        [*pretrain_args(prepared_dir, out), "--resume"], tmp_path, fault="checkpoint.during_rename:kill"
    )
    assert killed.returncode == -9
    assert "step_0000008" not in only_checkpoints(out) and ".step_0000008.old" in only_checkpoints(out)

    again = run([*pretrain_args(prepared_dir, out), "--resume"], tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "step_0000008" in again.stdout  # resumed from the recovered checkpoint, not step 4
    assert only_checkpoints(out) == ["step_0000004", "step_0000008"]
    assert losses(out) == losses(straight)


def test_disk_full_while_saving_is_a_clear_error_and_leaves_no_partial_checkpoint(prepared_dir, tmp_path):
    out = tmp_path / "run"
    result = run(pretrain_args(prepared_dir, out), tmp_path, fault="checkpoint.mid_shard:enospc@step=8")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    [line] = error_lines(result)
    assert "No space left on device" in line and "step_0000008" in line and "step_0000004" in line
    assert only_checkpoints(out) == ["step_0000004"]
    verify_checkpoint(checkpoint_dir(out, 4))


def flip_a_byte(ckpt: Path) -> Path:
    shard = sorted((ckpt / "model").glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x40
    shard.write_bytes(bytes(data))
    return shard


def remove_a_file(ckpt: Path) -> Path:
    shard = sorted((ckpt / "optimizer").glob("*.safetensors"))[0]
    shard.unlink()
    return shard


def reshape_a_tensor(ckpt: Path) -> Path:
    """The weights file rewritten (a valid safetensors file) with one tensor of another shape."""
    shard = sorted((ckpt / "model").glob("*.safetensors"))[0]
    weights = tensors(ckpt / "model")
    name = next(n for n, t in weights.items() if t.ndim == 2)
    weights[name] = weights[name].reshape(-1, 2).contiguous()
    save_file(weights, str(shard))
    return shard


def malform_the_manifest(ckpt: Path) -> Path:
    manifest = json.loads((ckpt / "manifest.json").read_text())
    del next(iter(manifest["files"].values()))["bytes"]
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    return ckpt / "manifest.json"


def add_a_stray_shard(ckpt: Path) -> Path:
    """A safetensors file the manifest does not list (DCP would read every one in the directory)."""
    stray = ckpt / "model" / "extra.safetensors"
    save_file({"wq": torch.zeros(2, 2)}, str(stray))
    return stray


@pytest.mark.parametrize(
    "corrupt", [flip_a_byte, remove_a_file, reshape_a_tensor, malform_the_manifest, add_a_stray_shard]
)
def test_corrupt_checkpoint_falls_back_or_stops_but_never_restarts(corrupt, prepared_dir, straight, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    bad = corrupt(checkpoint_dir(out, 8))
    args = pretrain_args(prepared_dir, out, steps=10)

    exact = run([*args, f"--resume-from={checkpoint_dir(out, 8)}"], tmp_path)  # this one or nothing
    assert exact.returncode == 2 and "Traceback" not in exact.stderr, exact.stderr[-3000:]
    [line] = error_lines(exact)
    assert bad.name in line

    fallback = run([*args, "--resume"], tmp_path)
    assert fallback.returncode == 0, fallback.stderr[-3000:]
    warning = next(line for line in fallback.stderr.splitlines() if "lmforge: warning" in line)
    assert "step_0000008" in warning and bad.name in warning
    assert "resuming from" in fallback.stdout and "step_0000004" in fallback.stdout
    assert losses(out)[5] == losses(straight)[5]  # step 5 ran again from step 4's state

    for ckpt in (checkpoint_dir(out, 4), checkpoint_dir(out, 8), checkpoint_dir(out, 10)):
        shutil.rmtree(ckpt, ignore_errors=True)
    (checkpoint_dir(out, 4)).mkdir()
    (checkpoint_dir(out, 4) / "manifest.json").write_text(
        json.dumps({"step": 4})
    )  # not even a valid manifest
    nothing = run([*args, "--resume"], tmp_path)
    [line] = error_lines(nothing)
    assert nothing.returncode == 2 and "no valid checkpoint" in line
    assert not checkpoint_dir(out, 10).exists()  # it did not start over from scratch


def test_resume_auto_never_restarts_a_run_whose_checkpoints_are_all_corrupt(prepared_dir, straight, tmp_path):
    """`--resume auto` starts a run only when it has no checkpoint at all: with checkpoints that all
    fail verification it stops with one line, as `--resume` does, and trains nothing."""
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    for step in (4, 8):
        (checkpoint_dir(out, step) / "manifest.json").write_text(json.dumps({"step": step}))  # no files
    result = run([*pretrain_args(prepared_dir, out, steps=10), "--resume", "auto"], tmp_path)
    [line] = error_lines(result)
    assert result.returncode == 2 and "no valid checkpoint" in line, result.stderr[-3000:]
    assert not checkpoint_dir(out, 10).exists() and losses(out) == losses(straight)


def test_disk_full_on_one_rank_is_the_same_clear_error_on_every_rank(prepared_dir, tmp_path):
    """Rank 1 fails mid-save; rank 0 must not wait for it in a collective until the timeout."""
    out = tmp_path / "run"
    args = pretrain_args(prepared_dir, out, "--train.micro_batch_size=4", "--parallel.timeout_s=60")
    result = run(args, tmp_path, nproc=2, fault="checkpoint.mid_shard:enospc@step=8,rank=1", timeout=55)
    assert result.returncode != 0
    lines = error_lines(result, torchrun=True)
    assert len(lines) == 2 and all("rank 1: OSError" in line and "No space left" in line for line in lines), (
        lines
    )
    assert only_checkpoints(out) == ["step_0000004"]


def test_a_line_cut_off_in_metrics_does_not_block_resume(prepared_dir, straight, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 9, "loss": 3.1')  # what a crash in the middle of a write leaves
    result = run([*pretrain_args(prepared_dir, out, steps=10), "--resume"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "cut off mid-write" in result.stderr
    assert sorted(losses(out)) == list(range(1, 11))

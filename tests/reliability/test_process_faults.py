"""Ranks that die, hang or are preempted under torchrun, and a single run stopped by a signal
(points 6, 7, 8). Two processes of the debug model on CPU with gloo."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from common import checkpoint_dir, error_lines, losses, pretrain_args, records, run, spawned

from lmforge.rundir import latest_checkpoint

STEPS = 10
DDP = ("--train.micro_batch_size=4",)  # 2 ranks x 4 = the recipe's 8 sequences per step


@pytest.fixture(scope="module")
def straight_2ranks(prepared_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("straight2") / "run"
    result = run(pretrain_args(prepared_dir, out, *DDP, steps=STEPS), out.parent, nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def straight_1rank(prepared_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("straight1") / "run"
    result = run(pretrain_args(prepared_dir, out, steps=STEPS), out.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_a_killed_rank_is_restarted_and_the_run_finishes_as_if_nothing_happened(
    prepared_dir, straight_2ranks, tmp_path
):
    out = tmp_path / "run"
    result = run(pretrain_args(prepared_dir, out, *DDP, steps=STEPS), tmp_path, nproc=2,
                 torchrun=("--max-restarts=2",), fault="train.step:kill@step=6,rank=1,restart=0")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from" in result.stdout and "step_0000004" in result.stdout  # attempt 2 resumed
    assert losses(out) == losses(straight_2ranks)  # final loss (and every other) bit for bit


def test_a_rank_that_keeps_dying_ends_the_job_with_the_cause(prepared_dir, tmp_path):
    out = tmp_path / "run"
    result = run(pretrain_args(prepared_dir, out, *DDP, steps=STEPS), tmp_path, nproc=2,
                 torchrun=("--max-restarts=2",), fault="train.step:kill@step=2,rank=1")  # fmt: skip
    assert result.returncode != 0
    assert "SIGKILL" in result.stderr and "rank      : 1" in result.stderr, result.stderr[-3000:]
    assert "resuming from" not in result.stdout  # it died before its first checkpoint each time
    assert result.stdout.count("model llama-debug") == 3  # the first attempt and two restarts


def test_a_hung_rank_ends_the_job_within_the_timeout(prepared_dir, tmp_path):
    """Rank 1 is SIGSTOPped after step 3; rank 0 waits in step 4's collective until parallel.timeout_s."""
    timeout_s = 8
    out = tmp_path / "run"
    args = pretrain_args(prepared_dir, out, *DDP, f"--parallel.timeout_s={timeout_s}", steps=STEPS)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "lmforge",
               *args]  # fmt: skip
    env = {**os.environ, "LMFORGE_FAULT": "train.step:stop@step=3,rank=1"}
    error_at = []
    with spawned(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env) as proc:
        reader = threading.Thread(
            target=lambda: error_at.extend(
                (time.monotonic(), line) for line in proc.stderr if "lmforge: error" in line
            ),
            daemon=True,
        )
        reader.start()
        deadline = time.monotonic() + 120
        # Rank 0 logs step 2, then rank 1 stops at the end of step 3 (before step 3's logging collective).
        while not any(r.get("step") == 2 for r in records_or_empty(out)):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        hung_at = time.monotonic()
        proc.wait(timeout=120)
        ended_at = time.monotonic()
        reader.join()
    assert proc.returncode != 0
    [(reported_at, line)] = error_at
    assert "rank 0" in line and "Timed out" in line and f"timeout_s={timeout_s}" in line
    assert reported_at - hung_at < timeout_s + 4, reported_at - hung_at  # the timeout, plus one step
    # torchrun then SIGTERMs the stopped rank, which cannot act on it, and SIGKILLs it 30 s later
    # (a fixed grace in torch 2.13's failure path, --shutdown-timeout notwithstanding).
    assert ended_at - hung_at < timeout_s + 30 + 10, ended_at - hung_at


def test_sigterm_on_one_rank_checkpoints_every_rank_and_exits_0(prepared_dir, straight_2ranks, tmp_path):
    out = tmp_path / "run"
    args = pretrain_args(prepared_dir, out, *DDP, steps=STEPS)
    result = run(args, tmp_path, nproc=2, fault="train.step:term@step=5,rank=1")
    assert result.returncode == 0, result.stderr[-3000:]
    # The signal arrived after step 5's flags were exchanged: every rank stops after step 6.
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {
        "step": 6,
        "stopped_by": "another rank's signal",
    }
    assert latest_checkpoint(out).name == "step_0000006"
    resumed = run([*args, "--resume"], tmp_path, nproc=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert losses(out) == losses(straight_2ranks)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_from_outside_checkpoints_at_the_next_step_and_exits_0(
    sig, prepared_dir, straight_1rank, tmp_path
):
    out = tmp_path / "run"
    args = pretrain_args(prepared_dir, out, steps=STEPS)
    # Slowed down (a 200-step schedule, so the run is still going when the signal arrives).
    slow = [*args[:-1], "--train.max_steps=200", "--schedule.total_steps=10"]
    command = [sys.executable, "-m", "lmforge", *slow]
    env = {**os.environ, "LMFORGE_FAULT": ""}
    with spawned(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env) as proc:
        deadline = time.monotonic() + 120
        while not any(r.get("step", 0) >= 3 for r in records_or_empty(out)):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        sent = time.monotonic()
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=60)
    grace = time.monotonic() - sent
    assert proc.returncode == 0, stderr[-3000:]
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["stopped_by"] == sig.name and grace < 20
    stopped_at = summary["step"]
    assert latest_checkpoint(out).name == f"step_{stopped_at:07d}"
    assert max(losses(out)) == stopped_at  # it stopped at the boundary after the signal


def records_or_empty(run_dir: Path) -> list[dict]:
    try:
        return records(run_dir)
    except (FileNotFoundError, json.JSONDecodeError):
        return []


def test_sigterm_resume_continues_exactly(prepared_dir, straight_1rank, tmp_path):
    out = tmp_path / "run"
    args = pretrain_args(prepared_dir, out, steps=STEPS)
    stopped = run(args, tmp_path, fault="train.step:term@step=6")
    assert stopped.returncode == 0 and not error_lines(stopped), stopped.stderr[-3000:]
    assert latest_checkpoint(out) == checkpoint_dir(out, 7)  # the boundary after the signal
    resumed = run([*args, "--resume"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert losses(out) == losses(straight_1rank)


def test_sigterm_to_the_whole_process_group_with_loader_workers(prepared_dir, tmp_path):
    """A scheduler signals every process of the job, the loader's workers included."""
    out = tmp_path / "run"
    args = pretrain_args(prepared_dir, out, "--data.loader_workers=2", "--schedule.total_steps=10", steps=200)
    with spawned([sys.executable, "-m", "lmforge", *args], cwd=tmp_path, stdout=subprocess.PIPE,
                 stderr=subprocess.PIPE, env={**os.environ, "LMFORGE_FAULT": ""}) as proc:  # fmt: skip
        deadline = time.monotonic() + 120
        while not any(r.get("step", 0) >= 3 for r in records_or_empty(out)):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr[-3000:]
    stopped_at = json.loads(stdout.strip().splitlines()[-1])["step"]
    assert latest_checkpoint(out).name == f"step_{stopped_at:07d}"


def test_a_restart_does_not_resume_a_run_its_first_attempt_refused(prepared_dir, straight_2ranks, tmp_path):
    """Without --resume an existing run is refused; torchrun's restart must refuse it again, not
    take TORCHELASTIC_RESTART_COUNT > 0 for permission to continue someone else's run."""
    out = tmp_path / "run"
    shutil.copytree(straight_2ranks, out)
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    result = run(pretrain_args(prepared_dir, out, *DDP, steps=STEPS + 2), tmp_path, nproc=2,
                 torchrun=("--max-restarts=1",))  # fmt: skip
    assert result.returncode != 0
    assert result.stderr.count("already has checkpoints") == 4  # 2 ranks x 2 attempts
    assert "resuming from" not in result.stdout
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before


def test_resume_auto_restarts_a_run_killed_before_its_first_checkpoint(
    prepared_dir, straight_1rank, tmp_path
):
    """A requeued job passes `--resume auto` (examples/slurm.sbatch): killed before its first
    checkpoint, it starts the run again; killed after one, it resumes from it. Either way it ends
    with the uninterrupted run's losses."""
    out = tmp_path / "run"
    args = pretrain_args(prepared_dir, out, steps=STEPS)  # checkpoints at steps 4 and 8
    killed = run(args, tmp_path, fault="train.step:kill@step=3")
    assert killed.returncode == -signal.SIGKILL and not (out / "checkpoints").exists()
    plain = run([*args, "--resume"], tmp_path)  # what --resume alone says to such a run
    [line] = error_lines(plain)
    assert plain.returncode == 2 and "has no checkpoint to resume from" in line

    again = run([*args, "--resume", "auto"], tmp_path, fault="train.step:kill@step=6")
    assert again.returncode == -signal.SIGKILL and "resuming from" not in again.stdout
    assert latest_checkpoint(out).name == "step_0000004"
    resumed = run([*args, "--resume=auto"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout and "step_0000004" in resumed.stdout
    assert losses(out) == losses(straight_1rank)

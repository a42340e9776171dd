"""A second Ctrl-C (point 8, lmforge.train.guards.StopSignal): the first asks for a checkpoint at the
next step boundary, the second interrupts at once, before that boundary, with no checkpoint.

Kept apart from test_process_faults.py because a reviewer's mutant (a second SIGINT taken like the
first) survived that module: it never sent a second signal."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from common import losses, pretrain_args, spawned


def wait_until_stopped(proc: subprocess.Popen, timeout: float = 120) -> None:
    """Until the process has stopped itself (SIGSTOP, state T in /proc/PID/stat)."""
    deadline = time.monotonic() + timeout
    stat = Path(f"/proc/{proc.pid}/stat")
    while stat.read_text().rsplit(")", 1)[1].split()[0] != "T":
        assert proc.poll() is None and time.monotonic() < deadline, "the process never stopped itself"
        time.sleep(0.02)


def test_a_second_sigint_interrupts_at_once_without_a_checkpoint(prepared_dir, tmp_path):
    out = tmp_path / "run"
    args = pretrain_args(prepared_dir, out, steps=10)  # periodic checkpoints at steps 4 and 8
    # Two SIGINTs pending at once are delivered as one, so the process holds still (SIGSTOP) where
    # each must land: the first at the end of step 5 (after step 5's flags were read, so the stop is
    # due at step 6's boundary), the second inside step 6's forward, before that boundary acts.
    env = {**os.environ, "LMFORGE_FAULT": "train.step:stop@step=5;train.loss:stop@step=6"}
    command = [sys.executable, "-m", "lmforge", *args]
    with spawned(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env) as proc:
        for _ in range(2):
            wait_until_stopped(proc)
            proc.send_signal(signal.SIGINT)  # pending while stopped, handled as soon as it runs again
            proc.send_signal(signal.SIGCONT)
        _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr[-3000:]
    assert stderr.splitlines()[-1] == "lmforge: interrupted"
    # Step 6 never finished and nothing was saved for the stop: only step 4's periodic checkpoint,
    # no step 6 and no temporary directory.
    assert max(losses(out)) == 5
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_0000004"]

"""`lmforge quickstart`, the real one: the whole stdlib corpus, the tiny llama, samples, a report.

The longest test of the suite (a few minutes on 2 cores): tests/conftest.py moves it to the front
of the run, so that under `pytest -n 2` (make test) it starts at once and the other worker runs the
rest of the suite beside it.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest


def run_cli(*args: str, cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "lmforge", *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, timeout=timeout)


@pytest.mark.slow
@pytest.mark.timeout(1500)  # ~5.5 min alone on 2 cores, up to 14 beside the rest of the suite
def test_quickstart_beats_unigram_entropy(tmp_path):
    """The real quickstart, end to end on the whole stdlib corpus (about 6 minutes on 2 cores)."""
    result = run_cli("quickstart", "--out", str(tmp_path / "qs"), cwd=tmp_path, timeout=1400)
    assert result.returncode == 0, result.stderr[-2000:]
    numbers = dict(
        re.findall(r"^(validation loss|unigram entropy of corpus)\s+([\d.]+)", result.stdout, re.M)
    )
    val_loss, entropy = float(numbers["validation loss"]), float(numbers["unigram entropy of corpus"])
    assert val_loss < entropy - 0.5, (val_loss, entropy)
    run = tmp_path / "qs"
    for name in ("config.yaml", "tokenizer.json", "metrics.jsonl", "loss.png"):
        assert (run / name).is_file()
    assert result.stdout.count("--- prompt") == 3

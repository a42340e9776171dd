"""benchmarks/gpu_train.py (which runs benchmarks/speedrun.py too) in --smoke mode on CPU: every
part of the one-shot GPU measurement runs end to end, so the script a GPU session relies on works."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "gpu_train.py"


@pytest.mark.slow  # ~40 s: a dozen tiny benchmarks and five short pretraining runs
def test_every_part_runs_and_the_table_is_printed_last(corpus_dir, tmp_path):
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--out", str(tmp_path), "--source", str(corpus_dir),
         "--vocab-size", "512", "--baseline-steps", "30"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert {row["part"] for row in rows} == {"gpt2", "llama1b", "switches", "host_sync", "fp8_loss", "speedrun"}
    measured = [row for row in rows if row["part"] != "speedrun" and "skipped" not in row["note"]]
    assert all(row["tokens_per_sec"] > 0 for row in measured)
    [speedrun] = [row for row in rows if row["part"] == "speedrun"]
    assert speedrun["corpus"]["tokens"]["train"] > 10_000 and speedrun["baseline"]["train_time_s"] > 0
    table = result.stdout.split("\n\n")[-2:]  # the throughput table, then the speedrun's
    assert "configuration" in table[0] and "target validation loss" in table[1]

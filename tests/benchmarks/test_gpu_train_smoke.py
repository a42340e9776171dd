"""benchmarks/gpu_train.py (which runs benchmarks/speedrun.py too) in --smoke mode on CPU: every
part of the one-shot GPU measurement runs end to end, so the script a GPU session relies on works."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "gpu_train.py"


@pytest.mark.slow  # ~40 s: a dozen tiny benchmarks and five short pretraining runs
def test_every_part_runs_and_the_table_is_printed_last(corpus_dir, tmp_path):
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--out", str(tmp_path / "out"), "--results",
         str(tmp_path / "results"), "--source", str(corpus_dir), "--vocab-size", "512", "--baseline-steps", "30"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    parts = ["run", "gpt2", "llama1b", "switches", "scale", "corpus", "host_sync", "fp8_loss", "speedrun"]
    assert sorted({row["part"] for row in rows}, key=parts.index) == parts
    assert rows[0]["part"] == "run" and rows[0]["device"] == "cpu"
    [corpus] = [row for row in rows if row["part"] == "corpus"]
    assert "train" in corpus["note"] and "error" not in corpus["note"]
    measured = [
        row
        for row in rows
        if row["part"] in ("gpt2", "llama1b", "switches", "scale", "host_sync", "fp8_loss")
    ]
    measured = [row for row in measured if "skipped" not in row["note"]]
    assert all(row["tokens_per_sec"] > 0 for row in measured)
    # FSDP2 and the three pipeline schedules on a process group of one, beside the plain model: in
    # fp32 on a CPU every configuration trains the same weights on the same tokens to the same loss.
    scale = [row for row in rows if row["part"] == "scale"]
    assert len(scale) == 7
    measured = [row for row in scale if not row["note"].startswith("skipped: torch")]  # interleaved < 2.13
    assert len(measured) >= 6 and all(row["note"].startswith("loss ") for row in measured)
    assert len({row["note"] for row in measured}) == 1
    [speedrun] = [row for row in rows if row["part"] == "speedrun"]
    assert speedrun["corpus"]["tokens"]["train"] > 10_000 and speedrun["baseline"]["train_time_s"] > 0
    assert speedrun["baseline_steps"] == 30
    table = result.stdout.split("\n\n")[-2:]  # the throughput table, then the speedrun's
    assert "configuration" in table[0] and "target validation loss" in table[1]

    # What a run cut off at a time limit leaves: every row so far, and each pretraining run's metrics.
    results = tmp_path / "results"
    assert [json.loads(line) for line in (results / "rows.jsonl").read_text().splitlines()] == rows
    for name in ("host_sync_1", "host_sync_10", "fp8_loss_bf16", "baseline", "fast"):
        assert (results / f"{name}.metrics.jsonl").stat().st_size > 0, name
    again = subprocess.run([sys.executable, str(SCRIPT), "--table", str(results / "rows.jsonl")],
                           capture_output=True, text=True, timeout=120)  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    rows_table, speedrun_table = again.stdout.split("\n\n")[-2:]
    # The same rows under the same device line; only the part durations are not kept.
    assert rows_table.strip().splitlines()[1:] == table[0].strip().splitlines()[1:]
    assert table[0].strip().startswith(rows_table.strip().splitlines()[0].removesuffix("  parts: "))
    assert speedrun_table == table[1]


def _gpu_train():
    spec = importlib.util.spec_from_file_location("gpu_train", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_failing_configuration_is_a_row_and_the_run_goes_on(tmp_path):
    gpu_train = _gpu_train()
    run = gpu_train.Runner(tmp_path, deadline_s=None)

    def out_of_memory() -> dict:
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")

    assert run.measure("llama1b", "too big", out_of_memory) == {}
    assert run.measure("llama1b", "fits", lambda: {"tokens_per_sec": 100.0, "mfu": 0.5}, reference=50.0)
    failed, fitted = run.rows
    assert failed["tokens_per_sec"] is None and failed["note"].startswith(
        "error: RuntimeError: CUDA out of memory"
    )
    assert fitted["ratio"] == 2.0 and fitted["note"] == ""
    assert [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()] == run.rows


def test_configurations_after_the_deadline_are_skipped_rows(tmp_path):
    gpu_train = _gpu_train()
    run = gpu_train.Runner(tmp_path, deadline_s=0.0)
    calls = []
    run.measure("switches", "late", lambda: calls.append(1) or {"tokens_per_sec": 1.0})
    assert calls == [] and run.rows[0]["note"].startswith("skipped: not started within --deadline-s")

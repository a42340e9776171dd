"""benchmarks/gpu_bench.py, the first figure a lent GPU measures (GPT-2 124M, lmforge vs Hugging Face):
its rounds and time budget with a fake clock, its summary, and --smoke runs on CPU (the Hugging Face
side only where transformers is installed; CI does not install it)."""

from __future__ import annotations

import importlib.util
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "gpu_bench.py"


def _gpu_bench():
    spec = importlib.util.spec_from_file_location("gpu_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_rounds_alternate_and_none_starts_that_would_end_past_the_budget():
    gpu_bench = _gpu_bench()
    clock, rows = FakeClock(), []

    def measure(thunk) -> dict:
        clock.now += 10.0  # every measurement takes 10 s: a round of two, 20 s
        return {"tokens_per_sec": thunk()["tokens_per_sec"], "note": ""}

    thunks = {"ours": lambda: {"tokens_per_sec": 2.0}, "theirs": lambda: {"tokens_per_sec": 1.0}}
    # Round 2 would end at 40 s (<= 45): it runs. Round 3 would end at 60 s: skipped, and so is 4.
    gpu_bench.run_rounds(thunks, 4, 45.0, 0.0, rows.append, measure, clock)
    assert [(row["round"], row["name"]) for row in rows] == [
        (1, "ours"), (1, "theirs"), (2, "ours"), (2, "theirs"), (3, None)
    ]  # fmt: skip
    assert rows[-1]["note"].startswith(
        "skipped round(s) 3-4: the last took 20 s, so this one would end 60 s in"
    )

    # The first round runs whatever the budget; without one, every round runs.
    rows.clear()
    gpu_bench.run_rounds(thunks, 3, 0.0, 0.0, rows.append, measure, clock)
    assert [row["name"] for row in rows] == ["ours", "theirs", None]
    rows.clear()
    gpu_bench.run_rounds(thunks, 3, None, 0.0, rows.append, measure, clock)
    assert len(rows) == 6


def test_a_failed_configuration_is_a_row_and_is_not_tried_again():
    gpu_bench = _gpu_bench()
    rows = []

    def out_of_memory() -> dict:
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")

    thunks = {"ours": lambda: {"tokens_per_sec": 2.0, "step_ms": 1.0}, "theirs": out_of_memory}
    gpu_bench.run_rounds(thunks, 2, None, 0.0, rows.append)
    assert [(row["round"], row["name"]) for row in rows] == [(1, "ours"), (1, "theirs"), (2, "ours")]
    assert rows[1]["tokens_per_sec"] is None
    assert rows[1]["note"] == "error: RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"


def test_the_summary_is_the_ratio_of_medians_with_the_range_of_the_rounds_ratios():
    gpu_bench = _gpu_bench()

    def row(round_: int, name: str, tokens: float | None, mfu: float | None = None) -> dict:
        return {"round": round_, "name": name, "tokens_per_sec": tokens, "step_ms": 1.0,
                "peak_mem_gib": 1.0 + round_, "mfu": mfu, "note": "" if tokens else "error: E: x"}  # fmt: skip

    rows = [row(1, "ours", 100.0, 0.4), row(1, "hf", 50.0), row(1, "broken", None),
            row(2, "ours", 110.0, 0.44), row(2, "hf", 50.0),
            row(3, "ours", 90.0, 0.36), row(3, "hf", 60.0), {"round": 4, "name": None, "note": "skipped"}]  # fmt: skip
    ours, hf, broken = gpu_bench.summarise(rows)
    assert (ours["rounds"], ours["median"], ours["min"], ours["max"]) == (3, 100.0, 90.0, 110.0)
    assert ours["ratio"] is None and ours["peak_mem_gib"] == 4.0
    assert hf["median"] == 50.0 and hf["ratio"] == 2.0
    # Per round: 100/50, 110/50, 90/60.
    assert (hf["ratio_min"], hf["ratio_max"]) == pytest.approx((1.5, 2.2))
    assert hf["mfu"] == pytest.approx(0.2)  # lmforge's FLOPs per token at HF's tokens/s
    assert broken["rounds"] == 0 and broken["median"] is None and broken["note"] == "error: E: x"


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(SCRIPT), "--smoke", *args], capture_output=True, text=True,
                            timeout=timeout)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _printed_rows(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.startswith("round ")]


def test_smoke_run_with_a_budget_keeps_each_row_as_measured(tmp_path):
    # --budget-s 0: the first round only, then a line saying the other two were skipped.
    result = _run(
        "--rounds", "3", "--budget-s", "0", "--steps", "1", "--warmup", "1", "--results", str(tmp_path)
    )
    lines = [json.loads(line) for line in (tmp_path / "gpt2_vs_hf.jsonl").read_text().splitlines()]
    assert "run" in lines[0] and "1 timed steps after 1, 3 round(s)" in lines[0]["run"]
    rows = lines[1:]
    assert rows[0]["name"] == "lmforge gpt2-debug fp32 eager" and rows[0]["tokens_per_sec"] > 0
    assert all(row["round"] == 1 for row in rows[:-1])
    assert rows[-1]["name"] is None and rows[-1]["note"].startswith("skipped round(s) 2-3")
    assert len(_printed_rows(result.stdout)) == len(rows)
    # The rows as they came, then the table, then the skipped rounds' line.
    before, table = result.stdout.split("\nconfiguration", 1)
    assert _printed_rows(before) == _printed_rows(result.stdout)
    assert table.splitlines()[1].startswith("lmforge gpt2-debug fp32 eager")
    assert table.strip().splitlines()[-1] == rows[-1]["note"]


def test_smoke_run_against_transformers_gives_a_ratio_per_round():
    pytest.importorskip("transformers")
    result = _run("--rounds", "2", "--steps", "1", "--warmup", "1")
    rows = _printed_rows(result.stdout)
    assert [row.split("  ")[:2] for row in rows] == [
        ["round 1", "lmforge gpt2-debug fp32 eager"], ["round 1", "HF GPT2LMHeadModel sdpa fp32 eager"],
        ["round 2", "lmforge gpt2-debug fp32 eager"], ["round 2", "HF GPT2LMHeadModel sdpa fp32 eager"],
    ]  # fmt: skip
    assert "error" not in result.stdout
    hf_line = result.stdout.strip().splitlines()[-1]
    assert (
        hf_line.startswith("HF GPT2LMHeadModel sdpa fp32 eager")
        and hf_line.endswith(")")
        and "x (" in hf_line
    )


def test_sigterm_prints_the_table_of_what_was_measured(tmp_path):
    process = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--smoke", "--rounds", "1000", "--results", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        lines = []
        for line in process.stdout:
            lines.append(line)
            if line.startswith("round 2 "):
                process.send_signal(signal.SIGTERM)
                break
        stdout = "".join(lines) + process.stdout.read()
        assert process.wait(timeout=60) == 0
    finally:
        process.kill()
    assert "terminated (SIGTERM)" in stdout
    table = stdout.split("\nconfiguration", 1)[1].splitlines()
    assert table[1].startswith("lmforge gpt2-debug fp32 eager")
    rows = [json.loads(line) for line in (tmp_path / "gpt2_vs_hf.jsonl").read_text().splitlines()[1:]]
    assert len(rows) == len(_printed_rows(stdout)) >= 2

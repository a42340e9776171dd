"""CPU tokens/s of two source trees of lmforge, alternated: did a change cost speed?

    git worktree add /tmp/before <commit>
    python benchmarks/ab_throughput.py --before /tmp/before/src --after src [--rounds 5]

Each round runs, in a fresh process per measurement and alternating before/after:
- `lmforge bench` (llama tiny, 8 x 256, fp32, eager, the step alone on random tokens), and
- `lmforge pretrain` of the tiny recipe for --steps steps on a prepared corpus (the whole loop:
  data, step, guards, logging; checkpoints off), whose tokens/s is the mean of its logged steps
  after the first log.
It prints one JSON line per measurement and a table of medians, min-max and the after/before ratio.
A run's first lines can include the corpus preparation (--data); prepare it before timing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

RECIPE = Path(__file__).parents[1] / "recipes" / "tiny.yaml"


def run_bench(src: str) -> float:
    command = [sys.executable, "-m", "lmforge", "bench", "--family", "llama", "--flavor", "tiny", "--batch-size", "8",
               "--seq-len", "256", "--steps", "6", "--warmup", "2", "--device", "cpu", "--precision", "fp32",
               "--compile", "false"]  # fmt: skip
    out = subprocess.run(
        command, env={**os.environ, "PYTHONPATH": src}, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["tokens_per_sec"]


def run_pretrain(src: str, data_dir: str, steps: int) -> tuple[float, float]:
    """(mean tokens/s of the logged steps after the first, the last logged loss)."""
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "-m", "lmforge", "pretrain", "--config", str(RECIPE), "--out", f"{out}/run",
                   f"--data.dir={data_dir}", f"--train.max_steps={steps}", "--train.eval_every=0",
                   "--train.eval_batches=1", "--train.sample_tokens=0", "--checkpoint.enabled=false",
                   "--logging.progress=false", "--logging.tensorboard=false", "--logging.plot=false",
                   "--logging.log_every=5", "--train.precision=fp32", "--train.compile=false"]  # fmt: skip
        subprocess.run(
            command, env={**os.environ, "PYTHONPATH": src}, capture_output=True, text=True, check=True
        )
        records = [json.loads(line) for line in Path(f"{out}/run/metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "tokens_per_sec" in r]
    return statistics.mean(r["tokens_per_sec"] for r in logged[1:]), logged[-1]["loss"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--before", required=True, help="src/ of the tree before the change")
    parser.add_argument("--after", required=True, help="src/ of the tree after the change")
    parser.add_argument("--data", default="/tmp/ab_throughput_data", help="prepared corpus (made if missing)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    if not (Path(args.data) / "manifest.json").is_file():
        subprocess.run([sys.executable, "-m", "lmforge", "data", "prepare", "--source", "stdlib", "--out", args.data,
                        "--vocab-size", "8192"], env={**os.environ, "PYTHONPATH": args.after}, check=True)  # fmt: skip
    results: dict[tuple[str, str], list[float]] = {}
    losses: dict[str, set[float]] = {"before": set(), "after": set()}
    for round_index in range(args.rounds):
        order = ("before", "after") if round_index % 2 == 0 else ("after", "before")
        for which in order:
            src = getattr(args, which)
            bench_tps = run_bench(src)
            loop_tps, loss = run_pretrain(src, args.data, args.steps)
            losses[which].add(loss)
            results.setdefault(("bench", which), []).append(bench_tps)
            results.setdefault(("pretrain", which), []).append(loop_tps)
            print(json.dumps({"round": round_index, "tree": which, "bench_tokens_per_sec": bench_tps,
                              "pretrain_tokens_per_sec": loop_tps, "pretrain_last_loss": loss}), flush=True)  # fmt: skip
    print("\n| measurement | before: median (min - max) | after: median (min - max) | after / before |")
    print("| --- | ---: | ---: | ---: |")
    for kind in ("bench", "pretrain"):
        before, after = results[(kind, "before")], results[(kind, "after")]
        cells = [f"{statistics.median(v):,.0f} ({min(v):,.0f} - {max(v):,.0f})" for v in (before, after)]
        print(
            f"| {kind} tokens/s | {cells[0]} | {cells[1]} | {statistics.median(after) / statistics.median(before):.3f} |"
        )
    print(f"\nlast pretrain loss: before {sorted(losses['before'])}, after {sorted(losses['after'])}")


if __name__ == "__main__":
    main()

"""Time to a validation loss: the `speedrun-baseline` and `speedrun-fast` recipes, one after the
other, on one GPU, on a corpus of the Python installation's own `.py` files.

    python benchmarks/speedrun.py [--out runs/speedrun] [--baseline-steps 1200] [--device cuda]

1. Prepares the corpus (`data.source: python`: the standard library and site-packages) once into
   OUT/data, with a held-out validation split, and reports its size in tokens.
2. Trains the baseline for --baseline-steps steps; its last validation loss is the target.
3. Trains the fast recipe, its schedule planned for half the baseline's steps (--fast-steps), until
   its first evaluation at or below the target (`train.target_val_loss`) or the schedule's end.
Times are `train_time_s` of the evaluation records: seconds spent training (compilation included),
evaluations and checkpoints left out, so both runs are timed by the same clock. Prints a table last.

--smoke runs the same code on a CPU in about a minute with debug-sized models and a small corpus
(tests/benchmarks runs it); its figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
SMOKE = ("--model.flavor=debug", "--data.seq_len=64", "--train.micro_batch_size=8",
         "--train.global_batch_tokens=512", "--train.device=cpu", "--train.eval_batches=4",
         "--schedule.warmup_steps=5")  # fmt: skip


def lmforge(*args: str) -> str:
    """Run `lmforge ARGS` in a fresh process (its own compile caches and GPU memory); its stdout."""
    result = subprocess.run([sys.executable, "-m", "lmforge", *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"lmforge {' '.join(args)} failed:\n{result.stderr[-3000:]}")
    return result.stdout


def prepare_corpus(out: Path, source: str, vocab_size: int) -> dict:
    """OUT/data from `source` (reused when it is there); the manifest's summary."""
    data_dir = out / "data"
    if not (data_dir / "manifest.json").is_file():
        lmforge("data", "prepare", f"--source={source}", f"--out={data_dir}", f"--vocab_size={vocab_size}")
    manifest = json.loads((data_dir / "manifest.json").read_text())
    return {"dir": str(data_dir), "source": manifest["source"], "vocab_size": manifest["vocab_size"],
            "documents": manifest["counts"]["documents"], "tokens": manifest["counts"]["tokens"]}  # fmt: skip


def run_recipe(recipe: str, run_dir: Path, data_dir: str, *overrides: str) -> list[dict]:
    """Train `recipe` into `run_dir` (what an earlier run left there is removed); its metrics.jsonl records."""
    shutil.rmtree(run_dir, ignore_errors=True)
    lmforge("pretrain", "--config", str(RECIPES / f"{recipe}.yaml"), "--out", str(run_dir),
            f"--data.dir={data_dir}", "--logging.progress=false", "--logging.tensorboard=false", *overrides)  # fmt: skip
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def evaluations(records: list[dict]) -> list[dict]:
    return [r for r in records if "val_loss" in r]


def time_to(target: float, records: list[dict]) -> dict | None:
    """The first evaluation at or below `target`, or None."""
    return next((r for r in evaluations(records) if r["val_loss"] <= target), None)


def speedrun(
    out: Path, baseline_steps: int, fast_steps: int, source: str, vocab_size: int, smoke: bool, device: str
) -> dict:
    corpus = prepare_corpus(out, source, vocab_size)
    extra = [f"--data.vocab_size={vocab_size}", *(SMOKE if smoke else [f"--train.device={device}"])]
    baseline = run_recipe("speedrun-baseline", out / "baseline", corpus["dir"], *extra,
                          f"--train.max_steps={baseline_steps}")  # fmt: skip
    target = evaluations(baseline)[-1]["val_loss"]
    # The fast schedule ends at fast_steps (its LR decays to 0 there): not reached by then, not reached.
    fast = run_recipe("speedrun-fast", out / "fast", corpus["dir"], *extra, f"--train.max_steps={fast_steps}",
                      f"--train.target_val_loss={target}")  # fmt: skip
    base_hit, fast_hit = time_to(target, baseline), time_to(target, fast)
    return {
        "corpus": corpus,
        "target_val_loss": target,
        "baseline": {"step": base_hit["step"], "train_time_s": base_hit["train_time_s"]},
        "fast": (
            {"step": fast_hit["step"], "train_time_s": fast_hit["train_time_s"]}
            if fast_hit
            else {
                "step": None,
                "train_time_s": None,
                "best_val_loss": min(r["val_loss"] for r in evaluations(fast)),
            }
        ),
        "time_ratio": fast_hit["train_time_s"] / base_hit["train_time_s"] if fast_hit else None,
    }


def print_table(result: dict) -> None:
    corpus = result["corpus"]
    print(f"\ncorpus {corpus['source']}: {corpus['tokens']['train']:,} train and {corpus['tokens']['val']:,} "
          f"validation tokens, vocab {corpus['vocab_size']}")  # fmt: skip
    print(f"target validation loss {result['target_val_loss']:.4f} (the baseline's last evaluation)")
    print(f"{'recipe':<20} {'step':>6} {'train s to target':>18}")
    for name in ("baseline", "fast"):
        row = result[name]
        reached = f"{row['train_time_s']:.1f}" if row["train_time_s"] is not None else "not reached"
        print(f"{name:<20} {row['step'] if row['step'] is not None else '-':>6} {reached:>18}")
    if result["time_ratio"] is not None:
        print(f"fast / baseline wall time to the target: {result['time_ratio']:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/speedrun"))
    parser.add_argument("--baseline-steps", type=int, default=1200)
    parser.add_argument(
        "--fast-steps", type=int, help="the fast recipe's schedule length (default: half the baseline's)"
    )
    parser.add_argument("--source", default="python", help="corpus (default: the Python installation)")
    parser.add_argument("--vocab-size", type=int, default=16384)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--smoke", action="store_true", help="debug-sized CPU run that checks the script")
    args = parser.parse_args()
    fast_steps = args.fast_steps or args.baseline_steps // 2
    result = speedrun(
        args.out, args.baseline_steps, fast_steps, args.source, args.vocab_size, args.smoke, args.device
    )
    print(json.dumps(result))
    print_table(result)


if __name__ == "__main__":
    main()

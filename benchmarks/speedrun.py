"""Time to a validation loss: the `speedrun-baseline` and `speedrun-fast` recipes, one after the
other, on one GPU, on a corpus of the Python installation's own `.py` files.

    python benchmarks/speedrun.py [--out runs/speedrun] [--baseline-minutes 4 | --baseline-steps N]

1. Prepares the corpus (`data.source: python`: the standard library and site-packages) once into
   OUT/data, with a held-out validation split, and reports its size in tokens.
2. Sizes the baseline: --baseline-steps, or as many steps as --baseline-minutes of training take at
   the tokens/s `lmforge bench` measures for the baseline's model and micro-batch on this GPU (its
   compiled graphs land in Inductor's cache, which the baseline run then reuses).
3. Trains the baseline for that many steps; its last validation loss is the target.
4. Trains the fast recipe, its schedule planned for half the baseline's steps (--fast-steps), until
   its first evaluation at or below the target (`train.target_val_loss`) or the schedule's end.
Times are `train_time_s` of the evaluation records: seconds spent training (compilation included),
evaluations and checkpoints left out, so both runs are timed by the same clock. Prints a table last.

The issue asks for the loss the baseline reaches in ~5 minutes; the default is 4 so that the whole
race (about 4 + 2 minutes, two compilations, evaluations) fits the lent GPU machine's 10-minute
limit on one command.

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

import yaml

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


def prepare_command(data_dir: Path, source: str, vocab_size: int, workers: int | None = None) -> list[str]:
    """The `lmforge data prepare` arguments that build the corpus into `data_dir`."""
    command = ["data", "prepare", f"--source={source}", f"--out={data_dir}", f"--vocab_size={vocab_size}"]
    return command + ([f"--num_workers={workers}"] if workers is not None else [])


def corpus_summary(data_dir: Path) -> dict:
    """What the table reports of a prepared corpus, from its manifest."""
    manifest = json.loads((data_dir / "manifest.json").read_text())
    return {"dir": str(data_dir), "source": manifest["source"], "vocab_size": manifest["vocab_size"],
            "documents": manifest["counts"]["documents"], "tokens": manifest["counts"]["tokens"]}  # fmt: skip


def prepare_corpus(out: Path, source: str, vocab_size: int) -> dict:
    """OUT/data from `source` (reused when it is there); the manifest's summary."""
    data_dir = out / "data"
    if not (data_dir / "manifest.json").is_file():
        lmforge(*prepare_command(data_dir, source, vocab_size))
    return corpus_summary(data_dir)


def recipe_value(recipe: str, section: str, key: str):
    return yaml.safe_load((RECIPES / f"{recipe}.yaml").read_text())[section][key]


def baseline_speed(device: str, vocab_size: int) -> float:
    """Tokens/s of the baseline's model (at `vocab_size`) at its micro-batch, compiled, on `device`
    (`lmforge bench`)."""
    import torch

    from lmforge.bench import bench

    batch = recipe_value("speedrun-baseline", "train", "micro_batch_size")
    seq_len = recipe_value("speedrun-baseline", "data", "seq_len")
    result = bench("gpt2", "124m", batch, seq_len, steps=10, warmup=3, precision="auto", compile=True,
                   device=device, vocab_size=vocab_size)  # fmt: skip
    torch.compiler.reset()
    torch.cuda.empty_cache()
    return result["tokens_per_sec"]


def baseline_steps_for(minutes: float, tokens_per_sec: float) -> int:
    """Steps of the baseline recipe that take about `minutes` of training at `tokens_per_sec`."""
    tokens_per_step = recipe_value("speedrun-baseline", "train", "global_batch_tokens")
    return max(1, round(minutes * 60 * tokens_per_sec / tokens_per_step))


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


def speedrun(out: Path, corpus: dict, baseline_steps: int, fast_steps: int, smoke: bool, device: str) -> dict:
    """The race on a prepared corpus (`corpus_summary`): the baseline, then the fast recipe to its loss."""
    extra = [f"--data.vocab_size={corpus['vocab_size']}", *(SMOKE if smoke else [f"--train.device={device}"])]
    baseline = run_recipe("speedrun-baseline", out / "baseline", corpus["dir"], *extra,
                          f"--train.max_steps={baseline_steps}")  # fmt: skip
    target = evaluations(baseline)[-1]["val_loss"]
    # The fast schedule ends at fast_steps (its LR decays to 0 there): not reached by then, not reached.
    fast = run_recipe("speedrun-fast", out / "fast", corpus["dir"], *extra, f"--train.max_steps={fast_steps}",
                      f"--train.target_val_loss={target}")  # fmt: skip
    base_hit, fast_hit = time_to(target, baseline), time_to(target, fast)
    return {
        "corpus": corpus,
        "baseline_steps": baseline_steps,
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
    print(
        f"target validation loss {result['target_val_loss']:.4f} (the baseline's last evaluation, "
        f"after {result['baseline_steps']} steps)"
    )
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
    parser.add_argument("--baseline-minutes", type=float, default=4.0,
                        help="size the baseline to about this much training time on this GPU")  # fmt: skip
    parser.add_argument(
        "--baseline-steps", type=int, help="the baseline's length (instead of --baseline-minutes)"
    )
    parser.add_argument(
        "--fast-steps", type=int, help="the fast recipe's schedule length (default: half the baseline's)"
    )
    parser.add_argument("--source", default="python", help="corpus (default: the Python installation)")
    parser.add_argument("--vocab-size", type=int, default=16384)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--smoke", action="store_true", help="debug-sized CPU run that checks the script")
    args = parser.parse_args()
    if args.smoke and args.baseline_steps is None:
        raise SystemExit("--smoke needs --baseline-steps")
    corpus = prepare_corpus(args.out, args.source, args.vocab_size)
    baseline_steps = args.baseline_steps or baseline_steps_for(
        args.baseline_minutes, baseline_speed(args.device, corpus["vocab_size"])
    )
    fast_steps = args.fast_steps or baseline_steps // 2
    result = speedrun(args.out, corpus, baseline_steps, fast_steps, args.smoke, args.device)
    print(json.dumps(result))
    print_table(result)


if __name__ == "__main__":
    main()

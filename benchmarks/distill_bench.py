"""Does the teacher help? A student with about a quarter of the teacher's non-embedding parameters,
trained with distillation and without it, same steps, data, seed (several seeds):

    python benchmarks/distill_bench.py --teacher runs/quickstart --out runs/distill-bench [--seeds 3]

The teacher is the quickstart's tiny llama (or any run of recipes/tiny.yaml). The student is a
llama of width 192 (6 heads, 3 kv heads) and 3 blocks: 1.22M non-embedding parameters against the
teacher's 4.72M (0.26x). Both students train with the quickstart's recipe (Muon, warmup-stable-
decay, bf16 autocast where the CPU has it) on the teacher's prepared corpus and tokenizer, and are
evaluated on the same validation windows (the run's own evaluation at its last step).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

from lmforge.config import load_config
from lmforge.models import build_model
from lmforge.rundir import resolve_checkpoint, run_model_config
from lmforge.train.pretrain import pretrain

STUDENT_SHAPE = {"dim": 192, "n_layers": 3, "n_heads": 6, "n_kv_heads": 3, "ffn_hidden": 512}


def block_params(cfg) -> int:
    """Parameters of the transformer blocks: the model without its token embedding and output head."""
    model = build_model(run_model_config(cfg.model, cfg.data.seq_len, 8192), "meta")
    return sum(p.numel() for name, p in model.named_parameters() if name.startswith("layers."))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", required=True, help="a tiny llama run (the quickstart's)")
    parser.add_argument("--out", default="runs/distill-bench")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=None, help="default: the teacher's recipe's")
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--temperature", type=float, default=1.0)
    args = parser.parse_args()
    teacher_dir = resolve_checkpoint(args.teacher).resolve()
    base = load_config(teacher_dir / "config.yaml")
    teacher_run = Path(args.teacher).resolve()
    steps = args.steps or base.train.max_steps
    student = replace(
        base,
        model=replace(base.model, shape=STUDENT_SHAPE),
        data=replace(base.data, dir=str(teacher_run / "data"), tokenizer=str(teacher_dir / "tokenizer.json")),
        train=replace(base.train, max_steps=steps, eval_every=steps, sample_tokens=0, init=None),
        checkpoint=replace(base.checkpoint, every_steps=0, keep_last=1),
        logging=replace(base.logging, progress=False, tensorboard=False, plot=False, log_every=50),
    )
    sizes = {name: block_params(cfg) for name, cfg in (("teacher", base), ("student", student))}
    print(
        json.dumps({"non_embedding_params": sizes, "ratio": sizes["student"] / sizes["teacher"]}), flush=True
    )
    results: dict[str, list[float]] = {"plain": [], "distilled": []}
    started = time.perf_counter()
    for seed in range(args.seeds):
        for name in ("plain", "distilled"):
            cfg = replace(student, train=replace(student.train, seed=seed))
            if name == "distilled":
                cfg = replace(
                    cfg,
                    distill=replace(
                        cfg.distill, teacher=str(teacher_dir), alpha=args.alpha, temperature=args.temperature
                    ),
                )
            result = pretrain(cfg, Path(args.out) / f"{name}-{seed}", resume="auto")
            results[name].append(result["val_loss"])
            print(json.dumps({"seed": seed, "student": name, "val_loss": result["val_loss"]}), flush=True)
    minutes = (time.perf_counter() - started) / 60
    print(
        f"\n{args.seeds} seeds x {steps} steps, alpha {args.alpha}, T {args.temperature}; {minutes:.1f} minutes\n"
    )
    print("| student | val loss per seed | mean |")
    print("| --- | --- | ---: |")
    for name, losses in results.items():
        print(f"| {name} | {', '.join(f'{v:.4f}' for v in losses)} | {statistics.mean(losses):.4f} |")
    wins = sum(d < p for d, p in zip(results["distilled"], results["plain"], strict=True))
    print(f"\ndistilled lower in {wins} of {args.seeds} seeds")


if __name__ == "__main__":
    main()

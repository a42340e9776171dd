"""Supervised fine-tuning throughput on this CPU: packed rows (several examples per row, each
attending only to itself) against padded rows (one example per row), alternated.

    python benchmarks/sft_packing.py [--rounds 3] [--steps 8]

Data: the built-in `stdlib-docstrings` task (lmforge.data.builtin): for each documented function of
a few standard-library packages, the prompt asks for the docstring of `name(arguments)` and the
response is that docstring (up to 600 characters): real text of varied length. Tokenizer: byte-level
BPE (8,192) trained on the json package.
Model: the llama `tiny` shape, random weights, fp32, eager, full fine-tuning, AdamW, batch 8 x 256,
through the fine-tuning step itself (lmforge.train.step, lmforge.train.sft). Reported: examples/s
and trained (assistant) tokens/s; the step time is about the same, what differs is how many examples
a step holds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from lmforge.config import OptimConfig, ParallelConfig, TrainConfig
from lmforge.data.builtin import STDLIB_DOCSTRINGS, stdlib_dir
from lmforge.data.prepare import prepare_data
from lmforge.data.sft import IGNORE_INDEX, SFTLoader, prepare_sft
from lmforge.models import model_config
from lmforge.parallel.apply import ModelLayout
from lmforge.train.sft import SupervisedFineTuning
from lmforge.train.step import build_train_step


def measure(data_dir: Path, packing: bool, steps: int, warmup: int, vocab: int) -> dict:
    torch.manual_seed(0)
    cfg = model_config("llama", "tiny", vocab_size=vocab, max_seq_len=256)
    step = build_train_step(cfg, TrainConfig(compile=False), ParallelConfig(), OptimConfig(), ModelLayout(),
                            torch.device("cpu"), torch.float32)  # fmt: skip
    loader = SFTLoader(data_dir, 8, 256, 0, 0, 1, packing, pad_id=2)
    objective = SupervisedFineTuning(loader, [], fused_loss=True, packing=packing)
    examples = trained = 0
    for i in range(warmup + steps):
        if i == warmup:
            started, consumed = time.perf_counter(), loader.consumed
        batch = objective.next_batch()
        if i >= warmup:
            trained += int((batch[1] != IGNORE_INDEX).sum())
        step.forward_backward([batch], objective.loss, i + 1)
        step.update(skip=False)
    elapsed = time.perf_counter() - started
    examples = loader.consumed - consumed
    return {"examples_per_s": examples / elapsed, "trained_tokens_per_s": trained / elapsed,
            "examples_per_row": examples / (8 * steps)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        prepare_data(str(stdlib_dir() / "json"), tmp / "text", vocab_size=8192, val_fraction=0.1, seed=0,
                     num_workers=1)  # fmt: skip
        manifest = prepare_sft(STDLIB_DOCSTRINGS, tmp / "sft", tmp / "text" / "tokenizer.json", 256, 0.05, 0)
        n = sum(manifest["examples"].values())
        vocab = 8256  # the tokenizer plus the two chat tokens, padded to a multiple of 64
        results: dict[str, list[dict]] = {"packed": [], "padded": []}
        for _ in range(args.rounds):
            for name in results:
                results[name].append(measure(tmp / "sft", name == "packed", args.steps, args.warmup, vocab))
                print(json.dumps({name: results[name][-1]}), flush=True)
    print(f"\n{n} examples ({manifest['examples']['train']} train, {manifest['truncated']} cut at 257 tokens); "
          f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}, llama tiny, batch 8 x 256, fp32, "
          f"{args.rounds} rounds of {args.steps} steps, alternated\n")  # fmt: skip
    print("| rows | examples per row | examples/s median (range) | trained tokens/s median | vs padded |")
    print("| --- | ---: | --- | ---: | ---: |")
    padded = results["padded"]
    for name, rows in results.items():
        eps = [r["examples_per_s"] for r in rows]
        ratio = statistics.median(
            a["examples_per_s"] / b["examples_per_s"] for a, b in zip(rows, padded, strict=True)
        )
        print(f"| {name} | {statistics.median(r['examples_per_row'] for r in rows):.2f} | {statistics.median(eps):.1f} "
              f"({min(eps):.1f} - {max(eps):.1f}) | {statistics.median(r['trained_tokens_per_s'] for r in rows):,.0f} | "
              f"**{ratio:.2f}x** |")  # fmt: skip


if __name__ == "__main__":
    main()

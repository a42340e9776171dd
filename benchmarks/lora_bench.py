"""LoRA fine-tuning throughput on this CPU: lmforge beside Hugging Face transformers + PEFT, and the
trainable-state bytes of full fine-tuning and LoRA for the 124m and 1b flavors.

    python benchmarks/lora_bench.py [--shapes tiny 124m] [--rounds 3] [--full]

Both sides: the same llama shape (lmforge's flavor, HF LlamaForCausalLM built from the same
numbers), fp32, eager, LoRA rank 8 / alpha 16 / no dropout on q, k, v and o, AdamW (betas 0.9,
0.95, weight decay 0.1), gradient clipping at 1.0, random tokens. tiny: batch 8 x 256; 124m:
batch 2 x 512. lmforge's step is `lmforge bench --lora-rank 8` (the fine-tuning step: model built,
transformed by lmforge.train.transforms, its optimizer); the two are alternated `--rounds` times.
`--full` adds full fine-tuning of both (every weight trains) for reference; `--compile` adds lmforge with
train.compile (each block compiled, or the whole model with `--compile-scope model`; the warm-up
steps compile).
Needs `pip install transformers peft`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from lmforge.adapt.lora import apply_lora
from lmforge.bench import bench
from lmforge.config import LoraConfig
from lmforge.models import build_model, model_config, spec_of

SHAPES = {"tiny": (8, 256), "124m": (2, 512)}
TARGETS_OURS = ["wq", "wk", "wv", "wo"]
TARGETS_HF = ["q_proj", "k_proj", "v_proj", "o_proj"]


def hf_step_fn(flavor: str, batch_size: int, seq_len: int, lora: bool):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    ours = model_config("llama", flavor, max_seq_len=seq_len)
    # The family's own Hugging Face map (lmforge.models.llama.hf): the same shape, RoPE base, norm eps.
    config = LlamaConfig(**spec_of(ours).hf.config_to_hf(ours), attn_implementation="sdpa")
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    if lora:
        peft_cfg = PeftLoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS_HF)
        model = get_peft_model(model, peft_cfg)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)

    def step() -> None:
        tokens = torch.randint(0, config.vocab_size, (batch_size, seq_len + 1))
        logits = model(input_ids=tokens[:, :-1]).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, sum(p.numel() for p in trainable)


def time_hf(flavor: str, batch_size: int, seq_len: int, steps: int, warmup: int, lora: bool) -> dict:
    step, trainable = hf_step_fn(flavor, batch_size, seq_len, lora)
    for _ in range(warmup):
        step()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    elapsed = time.perf_counter() - started
    return {"tokens_per_sec": batch_size * seq_len * steps / elapsed, "trainable_params": trainable}


def state_bytes(flavor: str, lora: bool) -> dict:
    """Parameter, gradient and AdamW-state bytes (fp32) of full fine-tuning or LoRA r=8 on q/k/v/o,
    from the model built on the meta device: params all, gradients and two AdamW moments per
    trainable element (tests/adapt/test_state_bytes.py checks the arithmetic against tensors)."""
    from lmforge.adapt.freeze import state_bytes as count

    model = build_model(model_config("llama", flavor), "meta")
    if lora:
        apply_lora(model, LoraConfig(rank=8, targets=TARGETS_OURS))
    return count(model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--full", action="store_true", help="also full fine-tuning of both")
    parser.add_argument("--compile", action="store_true", help="also lmforge with train.compile")
    parser.add_argument("--compile-scope", default="blocks", choices=["blocks", "model"],
                        help="train.compile_scope of --compile: each block compiled, or the whole model")  # fmt: skip
    args = parser.parse_args()

    results: dict[tuple[str, str], list[float]] = {}
    trainable: dict[tuple[str, str], int] = {}
    kinds = [True, False] if args.full else [True]
    for shape in args.shapes:
        batch_size, seq_len = SHAPES[shape]
        for _ in range(args.rounds):  # alternated: drift in the machine's load hits every row alike
            for lora in kinds:
                kind = "LoRA" if lora else "full"
                for compiled in (False, True) if args.compile else (False,):
                    ours = bench("llama", shape, batch_size, seq_len, args.steps, args.warmup, "fp32", compiled,
                                 "cpu", lora_rank=8 if lora else 0, lora_targets=TARGETS_OURS,
                                 compile_scope=args.compile_scope)  # fmt: skip
                    name = f"lmforge {kind}{f' compiled ({args.compile_scope})' if compiled else ''}"
                    results.setdefault((shape, name), []).append(ours["tokens_per_sec"])
                    trainable[(shape, name)] = ours["trainable_params"]
                theirs = time_hf(shape, batch_size, seq_len, args.steps, args.warmup, lora)
                name = f"{'PEFT' if lora else 'HF'} {kind}"
                results.setdefault((shape, name), []).append(theirs["tokens_per_sec"])
                trainable[(shape, name)] = theirs["trainable_params"]
                print(json.dumps({"shape": shape, "kind": kind, "lmforge (last)": ours["tokens_per_sec"],
                                  "hf": theirs["tokens_per_sec"]}), flush=True)  # fmt: skip

    print(f"\nCPU, {torch.get_num_threads()} threads, torch {torch.__version__}, fp32, {args.rounds} rounds "
          f"of {args.steps} steps after {args.warmup} warm-up steps, alternated\n")  # fmt: skip
    print(
        "| shape | configuration | trainable params | tokens/s median | range | vs PEFT/HF (median of per-round ratios) |"
    )
    print("| --- | --- | ---: | ---: | --- | ---: |")
    for shape in args.shapes:
        batch_size, seq_len = SHAPES[shape]
        for kind in ("LoRA", "full") if args.full else ("LoRA",):
            baseline = f"{'PEFT' if kind == 'LoRA' else 'HF'} {kind}"
            theirs = results[(shape, baseline)]
            names = [n for (sh, n) in results if sh == shape and n.startswith(f"lmforge {kind}")] + [baseline]
            for name in names:
                values = results[(shape, name)]
                ratio = statistics.median(a / b for a, b in zip(values, theirs, strict=True))
                print(f"| {shape} {batch_size}x{seq_len} | {name} | {trainable[(shape, name)]:,} | "
                      f"{statistics.median(values):,.0f} | {min(values):,.0f} - {max(values):,.0f} | "
                      f"{f'**{ratio:.2f}x**' if name != baseline else ''} |")  # fmt: skip

    print(
        "\n| flavor | fine-tuning | params bytes | gradient bytes | AdamW state bytes | trainable state (grad + AdamW) |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for flavor in ("124m", "1b"):
        for lora in (False, True):
            b = state_bytes(flavor, lora)
            print(f"| {flavor} | {'LoRA r=8 q/k/v/o' if lora else 'full'} | {b['params']:,} | {b['grads']:,} | "
                  f"{b['optimizer']:,} | {b['grads'] + b['optimizer']:,} |")  # fmt: skip


if __name__ == "__main__":
    main()

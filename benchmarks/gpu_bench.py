"""GPT-2 124M training throughput on one GPU: lmforge beside Hugging Face transformers, one run.

    python benchmarks/gpu_bench.py [--steps 30] [--batch-size 16]

Measures, in this one process on the same GPU:
  * lmforge `gpt2` 124m flavor (seq 1024, bf16 autocast, torch.compile, fused AdamW) via lmforge.bench;
  * transformers' GPT2LMHeadModel of the same shape (sdpa attention, bf16 autocast, fused AdamW),
    eager and with torch.compile; dropout 0 in both so both do the same work.
Prints one JSON line per configuration and a table last. Record the figures in
benchmarks/RESULTS.md with the device, date and commit.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F


def bench_hf(batch_size: int, seq_len: int, steps: int, warmup: int, compile: bool) -> dict:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=50304, n_positions=seq_len, n_embd=768, n_layer=12, n_head=12,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="sdpa",
        use_cache=False,  # no KV cache built in training forwards: lmforge builds none either
    )  # fmt: skip
    device = torch.device("cuda")
    model = GPT2LMHeadModel(config).to(device)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True
    )
    forward = torch.compile(model) if compile else model

    def step() -> None:
        tokens = torch.randint(0, config.vocab_size, (batch_size, seq_len + 1), device=device)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = forward(input_ids=tokens[:, :-1]).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    return {
        "name": f"HF GPT2LMHeadModel sdpa bf16{' compile' if compile else ''}",
        "tokens_per_sec": batch_size * seq_len * steps / elapsed,
        "step_ms": 1000 * elapsed / steps,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu_bench.py needs a CUDA GPU")

    from lmforge.bench import bench

    rows = []
    ours = bench("gpt2", "124m", args.batch_size, args.seq_len, args.steps, args.warmup, "bf16", True, "cuda")
    rows.append({"name": "lmforge gpt2-124m bf16 compile", **ours})
    print(json.dumps(rows[-1]), flush=True)
    for compile in (False, True):
        torch.compiler.reset()
        rows.append(bench_hf(args.batch_size, args.seq_len, args.steps, args.warmup, compile))
        print(json.dumps(rows[-1]), flush=True)

    baseline = rows[-1]["tokens_per_sec"]
    print(
        f"\n{torch.cuda.get_device_name()}  torch {torch.__version__}  batch {args.batch_size} x seq {args.seq_len}"
    )
    print(f"{'configuration':<40} {'tokens/s':>12} {'step ms':>9} {'peak GiB':>9} {'vs HF compile':>14}")
    for row in rows:
        print(f"{row['name']:<40} {row['tokens_per_sec']:>12,.0f} {row['step_ms']:>9.1f} "
              f"{row['peak_mem_gib']:>9.2f} {row['tokens_per_sec'] / baseline:>13.2f}x")  # fmt: skip
    print(f"lmforge MFU {100 * ours['mfu']:.1f}% against {ours['mfu_peak']}" if ours["mfu"] else "")


if __name__ == "__main__":
    main()

"""Training throughput of the `tiny` llama on this CPU: lmforge beside Hugging Face transformers.

    python benchmarks/cpu_bench.py [--steps 8] [--batch-size 8]

Both models have the same shape (lmforge's llama `tiny` flavor: 6 layers, 256 wide, 8 heads,
4 KV heads, SwiGLU 768, vocab 8192, seq 256), fp32, eager, SDPA attention, AdamW, one process.
Prints one JSON line per configuration and a table last. Needs `pip install transformers`.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from lmforge.bench import bench
from lmforge.models import model_config, spec_of


def bench_hf_llama(batch_size: int, seq_len: int, steps: int, warmup: int) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    ours = model_config("llama", "tiny", max_seq_len=seq_len)
    # The family's own Hugging Face map (lmforge.models.llama.hf): the same shape, RoPE base, norm eps.
    config = LlamaConfig(**spec_of(ours).hf.config_to_hf(ours), attn_implementation="sdpa")
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)

    def step() -> None:
        tokens = torch.randint(0, config.vocab_size, (batch_size, seq_len + 1))
        logits = model(input_ids=tokens[:, :-1]).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    elapsed = time.perf_counter() - started
    return {
        "name": "HF LlamaForCausalLM sdpa fp32",
        "params": sum(p.numel() for p in model.parameters()),
        "tokens_per_sec": batch_size * seq_len * steps / elapsed,
        "step_ms": 1000 * elapsed / steps,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="alternate the two this many times")
    args = parser.parse_args()

    rows = []
    for _ in range(args.repeats):  # alternate, so drift in the machine's load hits both alike
        ours = bench(
            "llama", "tiny", args.batch_size, args.seq_len, args.steps, args.warmup, "fp32", False, "cpu"
        )
        rows.append({"name": "lmforge llama-tiny fp32 eager", **ours})
        print(json.dumps(rows[-1]), flush=True)
        rows.append(bench_hf_llama(args.batch_size, args.seq_len, args.steps, args.warmup))
        print(json.dumps(rows[-1]), flush=True)

    print(
        f"\nCPU, {torch.get_num_threads()} threads, torch {torch.__version__}, batch {args.batch_size} x seq {args.seq_len}"
    )
    print(f"{'configuration':<34} {'params':>10} {'tokens/s':>10} {'step ms':>9}")
    for row in rows:
        print(
            f"{row['name']:<34} {row['params']:>10,} {row['tokens_per_sec']:>10,.0f} {row['step_ms']:>9.0f}"
        )
    best = {
        name: max(r["tokens_per_sec"] for r in rows if r["name"] == name)
        for name in {r["name"] for r in rows}
    }
    ours_best, hf_best = best["lmforge llama-tiny fp32 eager"], best["HF LlamaForCausalLM sdpa fp32"]
    print(f"lmforge / HF (best of {args.repeats}): {ours_best / hf_best:.2f}x")


if __name__ == "__main__":
    main()

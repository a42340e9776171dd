"""Does int8-dynamic's evaluation forward slow down with the other quantized models in the process?

    python benchmarks/int8_dynamic_diag.py [--threads 2] [--rounds 3]

One process builds the llama 124m shape (random weights) in fp32 and int8-dynamic and times one
forward of 4 x 256 tokens of each (fp32 compute, `--rounds` alternated rounds, medians); then it adds
the int4-weight and int8-weight models and runs them (forwards in fp32 and bf16 autocast, then a
64-token greedy decode of every model in both), timing the pair again after each step. One line per
step: both rates and int8-dynamic's ratio to fp32 (benchmarks/RESULTS.md, the compression section:
the full quantize_bench run measured 0.91x, runs of the pair alone 1.3x-1.4x).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch

from lmforge.compress.quantize import quantize_model
from lmforge.infer.generate import generate
from lmforge.models import build_model, model_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = model_config("llama", "124m", max_seq_len=1024)
    torch.manual_seed(0)
    fp32 = build_model(cfg).eval()
    dynamic = quantize_model(copy.deepcopy(fp32), "int8-dynamic", None)
    tokens = torch.randint(0, cfg.vocab_size, (4, 256))
    prompt = torch.randint(0, cfg.vocab_size, (32,)).tolist()

    @torch.no_grad()
    def rate(model, dtype: torch.dtype = torch.float32) -> float:
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            model(tokens)
        return tokens.numel() / (time.perf_counter() - started)

    def measure(after: str) -> None:
        rates: dict[str, list[float]] = {"fp32": [], "int8-dynamic": []}
        for _ in range(args.rounds):
            rates["fp32"].append(rate(fp32))
            rates["int8-dynamic"].append(rate(dynamic))
        median = {name: statistics.median(values) for name, values in rates.items()}
        ratio = median["int8-dynamic"] / median["fp32"]
        print(json.dumps({"after": after, "tokens_per_s": median, "int8_dynamic_vs_fp32": round(ratio, 3)}))

    rate(fp32), rate(dynamic)  # warm-up
    measure("fp32 and int8-dynamic only")
    int4 = quantize_model(copy.deepcopy(fp32), "int4-weight", None)
    measure("the int4-weight model built")
    rate(int4)
    measure("int4 run once in fp32")
    rate(int4, torch.bfloat16)
    measure("int4 run once in bf16 autocast")
    rate(dynamic, torch.bfloat16), rate(fp32, torch.bfloat16)
    measure("int8-dynamic and fp32 run once in bf16 autocast")
    int8_weight = quantize_model(copy.deepcopy(fp32), "int8-weight", None)
    measure("the int8-weight model built")
    rate(int8_weight), rate(int8_weight, torch.bfloat16)
    measure("int8-weight run in fp32 and bf16")
    for model in (fp32, dynamic, int4, int8_weight):
        for dtype in (torch.float32, torch.bfloat16):
            sum(1 for _ in generate(model, prompt, 64, temperature=0.0, dtype=dtype))
    measure("all four decoded (64 tokens, fp32 and bf16 each)")


if __name__ == "__main__":
    main()

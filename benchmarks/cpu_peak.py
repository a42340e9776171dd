"""The figures of the `cpu` entry of lmforge/hardware.yaml: bf16 and fp32 matmul peak and read
bandwidth of this machine on 2 threads (best of 5 timings of each).

    .venv/bin/python benchmarks/cpu_peak.py
"""

from __future__ import annotations

import json
import time

import torch


def best_seconds(fn, repeats: int = 5, inner: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        best = min(best, (time.perf_counter() - start) / inner)
    return best


def main() -> None:
    torch.set_num_threads(2)
    n = 2048
    result = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        seconds = best_seconds(lambda a=a, b=b: a @ b)
        result[f"{name}_matmul_tflops"] = round(2 * n**3 / seconds / 1e12, 3)
    x = torch.randn(2**28)  # 1 GiB of fp32
    result["read_gbs"] = round(x.numel() * 4 / best_seconds(x.sum, inner=1) / 1e9, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

"""The planner against a real GPU: predicted peak memory and step time beside what `lmforge bench`
measures (torch.cuda.max_memory_allocated, step time), for the 124m and 1b llama flavors in four
configurations each. Targets (issue "Plan", point 3): memory within 10%, step time within 20%.

    python benchmarks/plan_gpu_check.py [--results DIR]      (or: bash benchmarks/gpu_session.sh plan)

One GPU, no FSDP: bench's `plain` layout, fp32 parameters under bf16 autocast, which is what the
planner models for a layout without FSDP (dp_shard = 1); compile off, as the planner models eager
kernels.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from lmforge.bench import bench
from lmforge.hardware import cuda_device
from lmforge.models import model_config
from lmforge.plan.planner import Job, Layout, estimate

CONFIGS = [  # (flavor, batch, seq, activation checkpointing)
    ("124m", 8, 1024, "none"),
    ("124m", 16, 1024, "full"),
    ("124m", 4, 1024, "selective"),
    ("124m", 8, 1024, "selective"),
    ("1b", 1, 4096, "full"),
    ("1b", 2, 4096, "full"),
    ("1b", 1, 2048, "none"),
    ("1b", 2, 2048, "selective"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default=None, help="Directory for plan_gpu_check.jsonl")
    args = parser.parse_args()
    gpu = cuda_device(torch.cuda.get_device_name())
    if gpu is None:
        raise SystemExit(f"{torch.cuda.get_device_name()} is not in lmforge/hardware.yaml")
    rows = []
    for flavor, batch, seq, ac in CONFIGS:
        cfg = model_config("llama", flavor)
        predicted = estimate(Job(cfg, gpu, 1, seq, batch * seq), Layout(1, 1, 1, 1, batch, ac))
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        measured = bench("llama", flavor, batch, seq, steps=10, warmup=3, precision="bf16", compile=False,
                         activation_checkpointing=ac, layout="plain")  # fmt: skip
        row = {
            "flavor": flavor, "batch": batch, "seq": seq, "ac": ac, "device": gpu.name,
            "memory_gib": measured["peak_mem_gib"],
            # what the allocator hands out: no context, no fragmentation allowance
            "predicted_memory_gib": predicted.memory_gib_per_gpu - predicted.memory["context"]
            - predicted.memory["fragmentation"],
            "step_s": measured["step_ms"] / 1000, "predicted_step_s": predicted.step_time_s,
        }  # fmt: skip
        row["memory_ratio"] = row["predicted_memory_gib"] / row["memory_gib"]
        row["time_ratio"] = row["predicted_step_s"] / row["step_s"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.results:
        Path(args.results).mkdir(parents=True, exist_ok=True)
        Path(args.results, "plan_gpu_check.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()

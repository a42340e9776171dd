"""Print docs/communication.md's table: bytes per rank per step for llama 1b/7b/70b layouts.

python benchmarks/comm_table.py
"""

from __future__ import annotations

from lmforge.models import model_config
from lmforge.parallel.mesh import ParallelDims
from lmforge.plan.comm import comm_per_step

GIB = 2**30
# (GPUs, name, ParallelDims(pp, dp_replicate, dp_shard, tp))
LAYOUTS = [
    (8, "FSDP 8", ParallelDims(1, 1, 8, 1)),
    (8, "DDP 8", ParallelDims(1, 8, 1, 1)),
    (8, "TP 8", ParallelDims(1, 1, 1, 8)),
    (8, "FSDP 2 x TP 4", ParallelDims(1, 1, 2, 4)),
    (64, "FSDP 64", ParallelDims(1, 1, 64, 1)),
    (64, "HSDP 8 x 8", ParallelDims(1, 8, 8, 1)),
    (64, "FSDP 8 x TP 8", ParallelDims(1, 1, 8, 8)),
    (64, "PP 4 x FSDP 2 x TP 8", ParallelDims(4, 1, 2, 8)),
]


def cell(value: int) -> str:
    if value == 0:
        return "–"
    return "<0.01" if value / GIB < 0.005 else f"{value / GIB:.2f}"


def main() -> None:
    print(
        "| model | GPUs | layout | all-gather | reduce-scatter | all-reduce | p2p | broadcast | sent/rank (ring) | calls |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for flavor in ("1b", "7b", "70b"):
        cfg = model_config("llama", flavor)
        seq_len = 4096 if flavor == "7b" else 8192
        for gpus, name, dims in LAYOUTS:
            pp = dims.pp > 1
            v = comm_per_step(cfg, dims, 1, seq_len, grad_accum=8 if pp else 1, sequence_parallel=not pp,
                              pp_microbatches=8 if pp else None)  # fmt: skip
            wire = sum(v.wire_bytes().values())
            print(f"| {flavor} | {gpus} | {name} | {cell(v.all_gather)} | {cell(v.reduce_scatter)} | "
                  f"{cell(v.all_reduce)} | {cell(v.p2p)} | {cell(v.broadcast)} | {wire / GIB:.2f} | {v.n_calls} |")  # fmt: skip


if __name__ == "__main__":
    main()

"""The planner against published runs (docs/plan.md, "Against published runs").

    .venv/bin/python benchmarks/plan_validation.py [--fit]

Prints, for each published configuration, the planner's prediction beside the published figure.
--fit solves for lmforge.plan.planner.MATMUL_EFFICIENCY on the first row (the one fitted anchor)
and prints it; the other rows are out of sample.
"""

from __future__ import annotations

import argparse
import dataclasses

from lmforge.hardware import device
from lmforge.plan import planner
from lmforge.plan.planner import Job, Layout, estimate, parse_model


def megatron_flops_per_token(seq: int, layers: int, hidden: int, vocab: int) -> float:
    """Narayanan et al. 2021, eq. 3 per token: 96 l h^2 (1 + s / 6h + V / 16 l h), recomputation
    included (the FLOPs their TFLOP/s figures count)."""
    return 96 * layers * hidden**2 * (1 + seq / (6 * hidden) + vocab / (16 * layers * hidden))


@dataclasses.dataclass(frozen=True)
class Anchor:
    name: str
    source: str
    job: Job
    layout: Layout
    published: float  # in `unit`
    unit: str  # "TFLOP/s per GPU (eq. 3)" or "tokens/s per GPU"

    def predicted(self) -> float:
        e = estimate(self.job, self.layout)
        if self.unit == "tokens/s per GPU":
            return e.tokens_per_sec / self.job.n_gpus
        cfg = self.job.model
        flops = megatron_flops_per_token(self.job.seq_len, cfg.n_layers, cfg.dim, cfg.vocab_size)
        return e.tokens_per_sec * flops / self.job.n_gpus / 1e12


def anchors() -> list[Anchor]:
    gpt3 = parse_model("gpt2:175b,vocab_size=51200")
    one_t = parse_model("gpt2:dim=25600,n_layers=128,n_heads=160,vocab_size=51200,max_seq_len=2048")
    # Llama-3.1-8B (Meta's model card and params.json; 8.03B parameters)
    llama3_8b = parse_model(
        "llama:dim=4096,n_layers=32,n_heads=32,n_kv_heads=8,ffn_hidden=14336,vocab_size=128256,rope_theta=500000"
    )
    a100 = device("a100-80gb")
    return [
        Anchor(
            "GPT-3 175B, 1,024 A100 80GB, batch 1536, tp 8 pp 16 dp 8, full AC, interleaved",
            "Narayanan et al. 2021, sec. 5.1 (140 TFLOP/s; 138 as the issue quotes)",
            Job(gpt3, a100, 1024, 2048, 1536 * 2048),
            Layout(1, 8, 8, 16, 1, "full", "bf16", "interleaved_1f1b"),
            138.0,
            "TFLOP/s per GPU (eq. 3)",
        ),
        Anchor(
            "GPT-3 175B, 1,536 A100 80GB, batch 1536, tp 8 pp 12 dp 16, full AC, interleaved",
            "Narayanan et al. 2021, table 2 (PTD-P, 1536 GPUs)",
            Job(gpt3, a100, 1536, 2048, 1536 * 2048),
            Layout(1, 16, 8, 12, 1, "full", "bf16", "interleaved_1f1b"),
            141.0,
            "TFLOP/s per GPU (eq. 3)",
        ),
        Anchor(
            "1T (1008B), 3,072 A100 80GB, batch 3072, tp 8 pp 64 dp 6, full AC, interleaved",
            "Narayanan et al. 2021, table 1 (163 TFLOP/s, 502 PFLOP/s in all, 52%)",
            Job(one_t, a100, 3072, 2048, 3072 * 2048),
            Layout(1, 6, 8, 64, 1, "full", "bf16", "interleaved_1f1b"),
            163.0,
            "TFLOP/s per GPU (eq. 3)",
        ),
        Anchor(
            "Llama 3.1 8B, 8 H100 (96 GB, 500 W), FSDP 8, local batch 2, seq 8192, selective AC",
            "torchtitan benchmarks/llama3_h100_202412_torchtitan.md, table 1 (FSDP, no compile)",
            Job(llama3_8b, device("h100-96gb-500w"), 8, 8192, 16 * 8192),
            Layout(1, 8, 1, 1, 2, "selective", "bf16"),
            5762.0,
            "tokens/s per GPU",
        ),
    ]


def fit(anchor: Anchor) -> float:
    """MATMUL_EFFICIENCY that makes `anchor`'s prediction equal its published figure (bisection)."""
    low, high = 0.05, 1.0
    for _ in range(60):
        planner.MATMUL_EFFICIENCY = (low + high) / 2
        if anchor.predicted() > anchor.published:
            high = planner.MATMUL_EFFICIENCY
        else:
            low = planner.MATMUL_EFFICIENCY
    return planner.MATMUL_EFFICIENCY


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fit", action="store_true")
    args = parser.parse_args()
    rows = anchors()
    if args.fit:
        print(f"MATMUL_EFFICIENCY fitted on the first row: {fit(rows[0]):.4f}")
    print("| configuration | source | published | predicted | ratio |")
    print("| --- | --- | ---: | ---: | ---: |")
    for a in rows:
        p = a.predicted()
        print(f"| {a.name} | {a.source} | {a.published:,.0f} {a.unit} | {p:,.0f} | {p / a.published:.2f} |")


if __name__ == "__main__":
    main()

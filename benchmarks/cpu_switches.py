"""Tokens/s of the speed switches on this CPU, alternated: precision, torch.compile, optimizer.

    python benchmarks/cpu_switches.py [--rounds 3] [--steps 10] [--flavor tiny] [--batch-size 8]

Each round runs `lmforge bench` once per configuration, each in a fresh process, in the same
order, so that a drift of the machine's speed touches every configuration alike. It prints one
JSON line per measurement and then a table: median tokens/s, its min - max, the ratio to the first
configuration (fp32, eager, AdamW), and the median warm-up time (the untimed steps; with compile,
that includes compiling). The compile cost of a run is roughly warm-up(compiled) - warm-up(eager).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

CONFIGS: dict[str, list[str]] = {
    "fp32 eager adamw": ["--precision", "fp32", "--compile", "false"],
    "bf16 eager adamw": ["--precision", "bf16", "--compile", "false"],
    "fp32 compiled adamw": ["--precision", "fp32", "--compile", "true"],
    "bf16 compiled adamw": ["--precision", "bf16", "--compile", "true"],
    "bf16 compiled muon": ["--precision", "bf16", "--compile", "true", "--optimizer", "muon"],
}


def run(args: argparse.Namespace, switches: list[str]) -> dict:
    command = [sys.executable, "-m", "lmforge", "bench", "--family", "llama", "--flavor", args.flavor,
               "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--vocab_size", str(args.vocab_size), "--device", "cpu", *switches]  # fmt: skip
    out = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--flavor", default="tiny")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--only", nargs="*", help="configuration names to run (default: all)")
    args = parser.parse_args()
    configs = {name: switches for name, switches in CONFIGS.items() if not args.only or name in args.only}
    results: dict[str, list[dict]] = {name: [] for name in configs}
    for round_ in range(args.rounds):
        for name, switches in configs.items():
            result = run(args, switches)
            results[name].append(result)
            print(json.dumps({"round": round_, "config": name, **result}), flush=True)
    first = statistics.median(r["tokens_per_sec"] for r in next(iter(results.values())))
    print("\n| configuration | tokens/s, median | min - max | ratio | warm-up s, median |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, runs in results.items():
        rates = [r["tokens_per_sec"] for r in runs]
        median = statistics.median(rates)
        warmup = statistics.median(r["warmup_s"] for r in runs)
        print(
            f"| {name} | {median:,.0f} | {min(rates):,.0f} - {max(rates):,.0f} | {median / first:.2f}x | {warmup:.1f} |"
        )


if __name__ == "__main__":
    main()

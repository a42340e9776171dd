"""Every training-speed measurement of issue 5 in one run on one GPU; prints a table last.

    python benchmarks/gpu_train.py [--parts gpt2,llama1b,switches,host_sync,fp8_loss,speedrun]

Parts (each prints its rows as JSON lines as it goes, and its duration):
  gpt2       lmforge gpt2 124m (seq 1024, bf16, compiled blocks) beside Hugging Face transformers'
             GPT2LMHeadModel of the same shape, eager and compiled (benchmarks/gpu_bench.py).
  llama1b    llama 1b flavor, micro-batch 8 x 2048, bf16, AdamW: activation checkpointing none /
             selective / full (tokens/s and peak memory), and float8 (torchao) without it.
  switches   llama 124m flavor, 16 x 1024: each speed switch against compiled blocks (the default):
             eager, one whole-model graph, CUDA graphs, fused projections, the unfused loss.
  host_sync  `lmforge pretrain` of gpt2 124m reading the step flags every step (train.check_every=1)
             against every logging step (the default with a fused AdamW): tokens/s from metrics.jsonl.
  fp8_loss   `lmforge pretrain` of llama 1b for 200 steps on the speedrun corpus, bf16 then float8:
             tokens/s and the loss after 200 steps (mean of the last 20 steps).
  speedrun   benchmarks/speedrun.py: the fast recipe's wall time to the baseline's final validation loss.

MFU = (6N + attention FLOPs per token) x tokens/s / 989e12 (H100 SXM dense bf16), as `lmforge bench`.
Record the table in benchmarks/RESULTS.md with the device, date and commit.
--smoke runs every part on a CPU with debug-sized models in a minute or two, to check the script.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # gpu_bench, speedrun: scripts beside this one

from gpu_bench import bench_hf  # noqa: E402
from speedrun import prepare_corpus, run_recipe, speedrun  # noqa: E402
from speedrun import print_table as print_speedrun  # noqa: E402

from lmforge.bench import bench  # noqa: E402

PARTS = ("gpt2", "llama1b", "switches", "host_sync", "fp8_loss", "speedrun")


class Settings:
    """Shapes and lengths of the full run, or of --smoke (CPU, debug models, a few steps)."""

    def __init__(self, smoke: bool, steps: int, out: Path, vocab_size: int):
        self.smoke = smoke
        self.out = out
        self.device = "cpu" if smoke else "cuda"
        self.precision = "fp32" if smoke else "bf16"
        self.compile = not smoke  # inductor on a 2-core CPU would take the whole budget
        self.compiled = "compiled blocks" if self.compile else "eager (--smoke)"
        self.steps, self.warmup = (2, 1) if smoke else (steps, 5)
        self.small = "debug" if smoke else "124m"
        self.big = "debug" if smoke else "1b"
        self.batch_small, self.seq_small = (4, 64) if smoke else (16, 1024)
        self.batch_big, self.seq_big = (4, 64) if smoke else (8, 2048)
        self.fp8_steps = 20 if smoke else 200
        self.pretrain_extra = [f"--data.vocab_size={vocab_size}"] + (
            ["--model.flavor=debug", "--data.seq_len=64", "--train.device=cpu", "--train.micro_batch_size=4"]
            if smoke
            else []
        )

    def bench(self, family: str, flavor: str, batch: int, seq: int, **switches) -> dict:
        switches.setdefault("compile", self.compile)
        result = bench(family, flavor, batch, seq, self.steps, self.warmup, self.precision,
                       device=self.device, **switches)  # fmt: skip
        _free()
        return result


def _free() -> None:
    gc.collect()
    torch.compiler.reset()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _row(part: str, name: str, result: dict, reference: float | None = None, note: str = "") -> dict:
    tokens_per_sec = result.get("tokens_per_sec")
    return {
        "part": part,
        "name": name,
        "tokens_per_sec": tokens_per_sec,
        "mfu": result.get("mfu"),
        "peak_mem_gib": result.get("peak_mem_gib"),
        "ratio": tokens_per_sec / reference if reference and tokens_per_sec else None,
        "note": note,
    }


def part_gpt2(s: Settings) -> list[dict]:
    ours = s.bench("gpt2", s.small, s.batch_small, s.seq_small)
    rows = [_row("gpt2", f"lmforge gpt2-{s.small} {s.precision} {s.compiled}", ours)]
    if s.smoke:
        return rows  # bench_hf needs CUDA
    for compile in (False, True):
        hf = bench_hf(s.batch_small, s.seq_small, s.steps, s.warmup, compile)
        _free()
        rows.append(_row("gpt2", hf["name"], hf, note="ratio: lmforge / this"))
        rows[-1]["ratio"] = ours["tokens_per_sec"] / hf["tokens_per_sec"]
    return rows


def part_llama1b(s: Settings) -> list[dict]:
    rows, reference = [], None
    for ac in ("none", "selective", "full"):
        result = s.bench("llama", s.big, s.batch_big, s.seq_big, activation_checkpointing=ac)
        reference = reference or result["tokens_per_sec"]
        rows.append(_row("llama1b", f"llama-{s.big} {s.precision} AC {ac}", result, reference))
    float8_ok = not s.smoke and torch.cuda.get_device_capability() >= (8, 9)
    if float8_ok:
        result = s.bench("llama", s.big, s.batch_big, s.seq_big, float8=True)
        rows.append(_row("llama1b", f"llama-{s.big} float8 AC none", result, reference))
    else:
        rows.append(
            _row("llama1b", f"llama-{s.big} float8", {}, note="skipped: needs a GPU of capability >= 8.9")
        )
    return rows


def part_switches(s: Settings) -> list[dict]:
    base = s.bench("llama", s.small, s.batch_small, s.seq_small)
    rows = [_row("switches", f"{s.compiled} (reference)", base, base["tokens_per_sec"])]
    variants = {
        "eager (no compile)": {"compile": False},
        "compile whole model": {"compile_scope": "model"},
        "CUDA graphs (reduce-overhead)": {"compile_mode": "reduce-overhead"},
        "fused q/k/v and gate/up": {"fused_projections": True},
        "unfused loss (full logits)": {"fused_loss": False},
    }
    for name, switches in variants.items():
        if s.smoke and "compile_mode" in switches:
            continue  # CUDA graphs need CUDA
        rows.append(_row("switches", name, s.bench("llama", s.small, s.batch_small, s.seq_small, **switches),
                         base["tokens_per_sec"]))  # fmt: skip
    return rows


def _pretrain_throughput(records: list[dict], skip: int) -> float:
    """Mean tokens/s of the logged steps after the first `skip` (compilation, warm-up)."""
    values = [r["tokens_per_sec"] for r in records if "tokens_per_sec" in r and r["step"] > skip]
    return sum(values) / len(values)


def part_host_sync(s: Settings, data_dir: str) -> list[dict]:
    rows, reference = [], None
    steps = 20 if s.smoke else 120
    for check_every in (1, 10):
        records = run_recipe(
            "speedrun-baseline", s.out / f"host_sync_{check_every}", data_dir, *s.pretrain_extra,
            f"--train.max_steps={steps}", "--train.eval_every=0", "--logging.log_every=10",
            f"--train.check_every={check_every}", "--optim.fused=true", "--train.global_batch_tokens=null",
        )  # fmt: skip
        result = {"tokens_per_sec": _pretrain_throughput(records, skip=steps // 3)}
        reference = reference or result["tokens_per_sec"]
        rows.append(_row("host_sync", f"pretrain gpt2 check_every={check_every}", result, reference))
    return rows


def part_fp8_loss(s: Settings, data_dir: str) -> list[dict]:
    if not s.smoke and torch.cuda.get_device_capability() < (8, 9):
        return [
            _row("fp8_loss", "float8 loss tracking", {}, note="skipped: needs a GPU of capability >= 8.9")
        ]
    rows, reference, reference_loss = [], None, None
    for float8 in (False,) if s.smoke else (False, True):  # float8 refuses a CPU
        records = run_recipe(
            "llama-1b", s.out / f"fp8_loss_{float8}", data_dir, *s.pretrain_extra,
            f"--train.max_steps={s.fp8_steps}", "--train.eval_every=0", "--logging.log_every=1",
            "--schedule.warmup_steps=20", f"--train.micro_batch_size={s.batch_big}", "--train.global_batch_tokens=null",
            "--checkpoint.every_steps=0", *(["--train.float8=true"] if float8 else []),
        )  # fmt: skip
        losses = [r["loss"] for r in records if "loss" in r]
        final_loss = sum(losses[-20:]) / len(losses[-20:])
        result = {"tokens_per_sec": _pretrain_throughput(records, skip=s.fp8_steps // 10)}
        reference = reference or result["tokens_per_sec"]
        reference_loss = reference_loss or final_loss
        note = (
            f"loss@{len(losses)} {final_loss:.4f} ({100 * (final_loss / reference_loss - 1):+.2f}% vs bf16)"
        )
        rows.append(
            _row(
                "fp8_loss",
                f"pretrain llama-{s.big} {'float8' if float8 else 'bf16'}",
                result,
                reference,
                note,
            )
        )
    return rows


def print_table(rows: list[dict], durations: dict[str, float]) -> None:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(
        f"\n{device}  torch {torch.__version__}  parts: "
        + ", ".join(f"{p} {t:.0f}s" for p, t in durations.items())
    )
    print(
        f"{'part':<10} {'configuration':<44} {'tokens/s':>11} {'MFU':>6} {'peak GiB':>9} {'ratio':>6}  note"
    )
    for row in rows:
        tokens = f"{row['tokens_per_sec']:,.0f}" if row["tokens_per_sec"] else "-"
        mfu = f"{100 * row['mfu']:.1f}%" if row["mfu"] else "-"
        memory = f"{row['peak_mem_gib']:.1f}" if row["peak_mem_gib"] else "-"
        ratio = f"{row['ratio']:.2f}x" if row["ratio"] else "-"
        print(
            f"{row['part']:<10} {row['name']:<44} {tokens:>11} {mfu:>6} {memory:>9} {ratio:>6}  {row['note']}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per `lmforge bench` configuration")
    parser.add_argument("--out", type=Path, default=Path("runs/gpu_train"))
    parser.add_argument("--baseline-steps", type=int, default=1200, help="speedrun baseline length")
    parser.add_argument("--source", default="python", help="corpus of the pretrain parts")
    parser.add_argument("--vocab-size", type=int, default=16384)
    parser.add_argument("--smoke", action="store_true", help="CPU, debug-sized models: checks the script")
    args = parser.parse_args()
    parts = args.parts.split(",")
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise SystemExit(f"unknown part(s) {unknown}; parts are {', '.join(PARTS)}")
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu_train.py needs a CUDA GPU (or --smoke)")
    s = Settings(args.smoke, args.steps, args.out, args.vocab_size)

    rows: list[dict] = []
    durations: dict[str, float] = {}
    speedrun_result = None
    data_dir = None
    for part in parts:
        started = time.perf_counter()
        if part in ("host_sync", "fp8_loss") and data_dir is None:
            data_dir = prepare_corpus(args.out / "speedrun", args.source, args.vocab_size)["dir"]
        if part == "speedrun":
            speedrun_result = speedrun(args.out / "speedrun", args.baseline_steps, args.baseline_steps // 2,
                                       args.source, args.vocab_size, args.smoke, s.device)  # fmt: skip
            new_rows = [{"part": "speedrun", **speedrun_result}]
        elif part == "host_sync":
            new_rows = part_host_sync(s, data_dir)
        elif part == "fp8_loss":
            new_rows = part_fp8_loss(s, data_dir)
        else:
            new_rows = {"gpt2": part_gpt2, "llama1b": part_llama1b, "switches": part_switches}[part](s)
        durations[part] = time.perf_counter() - started
        for row in new_rows:
            print(json.dumps(row), flush=True)
        rows += [r for r in new_rows if r["part"] != "speedrun"]
    print_table(rows, durations)
    if speedrun_result is not None:
        print_speedrun(speedrun_result)


if __name__ == "__main__":
    main()

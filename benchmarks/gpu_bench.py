"""GPT-2 124M training throughput on one GPU: lmforge beside Hugging Face transformers, alternated.

    python benchmarks/gpu_bench.py [--rounds 3] [--steps 40] [--warmup 8] [--budget-s S] [--results DIR]
    python benchmarks/gpu_bench.py --smoke        # CPU, the debug-sized GPT-2, eager: checks the script

Measures, in this one process on the same GPU, in rounds: each round runs every configuration
once, in the same order, so that drift in the GPU's clocks or the host's load hits all of them:
  1. lmforge `gpt2` 124m flavor (seq 1024, bf16 autocast, torch.compile of the blocks, fused
     AdamW, fused loss: lmforge's defaults) through lmforge.bench;
  2. transformers' GPT2LMHeadModel of the same shape (sdpa attention, bf16 autocast, fused AdamW,
     full logits and F.cross_entropy), eager;
  3. the same, with torch.compile.
Dropout is 0 in both, so both do the same work. Each configuration is built afresh each round; from
the second round on its compilation is mostly read from Inductor's on-disk cache.

Each measurement is printed as it comes (with its wall time, compilation included), and appended to
DIR/gpt2_vs_hf.jsonl with --results, so a run cut off keeps what it measured. The table comes last:
each configuration's median tokens/s over the rounds with its min - max, and for each Hugging Face
configuration lmforge / it, the ratio of the medians and the range of the per-round ratios. A
configuration that fails (out of memory, a compile error, transformers not installed) is a row with
its error and is not tried again; the others go on. SIGTERM (a `timeout`) prints the table of what
was measured so far.

--budget-s S: a round after the first starts only if it should end within S seconds of the start
(counted once Python and torch have started), judged by the last round's duration: the first round
compiles cold, so it overestimates the later ones. The first round always runs. On the lent GPU
machine benchmarks/gpu_session.sh runs this with --budget-s 230 under a hard limit of 270 s, first
in its first call; docs/speed.md ("Time budget") gives the time estimates and why 3 rounds of 40
steps give a usable ratio.
Record the table in benchmarks/RESULTS.md with the device, date and commit.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import signal
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

Record = Callable[[dict], None]
# Sizes unless given: (on the GPU, with --smoke).
SIZES = {"steps": (40, 2), "warmup": (8, 1), "batch_size": (16, 4), "seq_len": (1024, 64)}


def bench_hf(
    batch_size: int, seq_len: int, steps: int, warmup: int, compile: bool, flavor: str = "124m",
    device: str = "cuda",
) -> dict:  # fmt: skip
    """transformers' GPT2LMHeadModel of lmforge's gpt2 `flavor` shape, trained on random tokens.

    bf16 autocast and a fused AdamW on CUDA; fp32 and a plain AdamW on CPU (--smoke)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from lmforge.models import model_config

    ours = model_config("gpt2", flavor, max_seq_len=seq_len)
    config = GPT2Config(
        vocab_size=ours.vocab_size, n_positions=seq_len, n_embd=ours.dim, n_layer=ours.n_layers,
        n_head=ours.n_heads, layer_norm_epsilon=ours.norm_eps, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, attn_implementation="sdpa", bos_token_id=None, eos_token_id=None,  # unused
        use_cache=False,  # no KV cache built in training forwards: lmforge builds none either
    )  # fmt: skip
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    model = GPT2LMHeadModel(config).to(dev)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=cuda
    )
    forward = torch.compile(model) if compile else model

    def step() -> None:
        tokens = torch.randint(0, config.vocab_size, (batch_size, seq_len + 1), device=dev)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda):
            logits = forward(input_ids=tokens[:, :-1]).logits  # (B, T, vocab)
        loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    return {
        "name": hf_name(compile, "bf16" if cuda else "fp32"),
        "tokens_per_sec": batch_size * seq_len * steps / elapsed,
        "step_ms": 1000 * elapsed / steps,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
    }


def hf_name(compile: bool, precision: str) -> str:
    return f"HF GPT2LMHeadModel sdpa {precision} {'compile' if compile else 'eager'}"


def configurations(args: argparse.Namespace) -> dict[str, Callable[[], dict]]:
    """Name -> thunk that measures it, in the order of a round; lmforge's first."""
    from lmforge.bench import bench

    device, precision, flavor = ("cpu", "fp32", "debug") if args.smoke else ("cuda", "bf16", "124m")
    compiled = not args.smoke  # Inductor on a small CPU would take longer than the whole check
    sizes = dict(batch_size=args.batch_size, seq_len=args.seq_len, steps=args.steps, warmup=args.warmup)
    ours = f"lmforge gpt2-{flavor} {precision} {'compiled blocks' if compiled else 'eager'}"
    thunks = {ours: functools.partial(bench, family="gpt2", flavor=flavor, precision=precision,
                                      compile=compiled, device=device, **sizes)}  # fmt: skip
    # Eager before compiled: if a cold compilation runs past the limit, lmforge still has a ratio.
    for compile in (False, True) if compiled else (False,):
        thunks[hf_name(compile, precision)] = functools.partial(
            bench_hf, compile=compile, flavor=flavor, device=device, **sizes
        )
    return thunks


def _free() -> None:
    gc.collect()
    torch.compiler.reset()  # a fresh Dynamo each time: rebuilt modules never hit its recompile limit
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _one_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
    return f"{type(err).__name__}: {lines[0][:200]}"


def measure_one(thunk: Callable[[], dict]) -> dict:
    """One configuration's row fields: its figures and wall time (build and compilation included),
    or its error in `note`."""
    started = time.perf_counter()
    try:
        result, note = thunk(), ""
    except (Exception, SystemExit) as err:  # recorded as a row; the other configurations go on
        result, note = {}, f"error: {_one_line(err)}"
    finally:
        _free()
    return {
        "tokens_per_sec": result.get("tokens_per_sec"),
        "step_ms": result.get("step_ms"),
        "peak_mem_gib": result.get("peak_mem_gib"),
        "mfu": result.get("mfu"),
        "seconds": time.perf_counter() - started,
        "note": note,
    }


def run_rounds(
    thunks: dict[str, Callable[[], dict]], rounds: int, budget_s: float | None, started: float,
    record: Record, measure: Callable[[Callable[[], dict]], dict] = measure_one,
    clock: Callable[[], float] = time.perf_counter,
) -> None:  # fmt: skip
    """Measure every configuration once per round, `record`ing each row as it is measured.

    A round after the first starts only if `clock() - started` plus the last round's duration is
    within `budget_s`; otherwise one row says which rounds were skipped. A configuration that
    failed is not tried again."""
    failed: set[str] = set()
    last_round_s = None
    for index in range(1, rounds + 1):
        round_started = clock()
        expected_end = round_started - started + (last_round_s or 0.0)
        if last_round_s is not None and budget_s is not None and expected_end > budget_s:
            record({"round": index, "name": None, "note": f"skipped round(s) {index}-{rounds}: the last "
                    f"took {last_round_s:.0f} s, so this one would end {expected_end:.0f} s in, past "
                    f"--budget-s {budget_s:g}"})  # fmt: skip
            return
        for name, thunk in thunks.items():
            if name in failed:
                continue
            row = {"round": index, "name": name, **measure(thunk)}
            if row["tokens_per_sec"] is None:
                failed.add(name)
            record(row)
        last_round_s = clock() - round_started


def summarise(rows: list[dict]) -> list[dict]:
    """Per configuration (in the order measured): median tokens/s over its rounds, min, max,
    and for all but the first (lmforge) the first's median / its median with the range of the
    per-round ratios. MFU of every configuration is of the same work, lmforge's FLOPs per token."""
    rows = [row for row in rows if row.get("name")]
    names = list(dict.fromkeys(row["name"] for row in rows))
    if not names:
        return []
    measured = {name: [r for r in rows if r["name"] == name and r["tokens_per_sec"]] for name in names}
    ours = {r["round"]: r["tokens_per_sec"] for r in measured[names[0]]}
    mfu_per_token_per_sec = [r["mfu"] / r["tokens_per_sec"] for r in measured[names[0]] if r["mfu"]]
    lines = []
    for name in names:
        tokens = [r["tokens_per_sec"] for r in measured[name]]
        errors = [r["note"] for r in rows if r["name"] == name and r["note"]]
        line = {"name": name, "rounds": len(tokens), "median": None, "min": None, "max": None, "step_ms": None,
                "peak_mem_gib": None, "mfu": None, "ratio": None, "ratio_min": None, "ratio_max": None,
                "note": errors[0] if errors else ""}  # fmt: skip
        if tokens:
            memory = [r["peak_mem_gib"] for r in measured[name] if r["peak_mem_gib"] is not None]
            line.update(
                median=statistics.median(tokens), min=min(tokens), max=max(tokens),
                step_ms=statistics.median(r["step_ms"] for r in measured[name]),
                peak_mem_gib=max(memory) if memory else None,
            )  # fmt: skip
            if mfu_per_token_per_sec:
                line["mfu"] = line["median"] * statistics.median(mfu_per_token_per_sec)
        paired = [ours[r["round"]] / r["tokens_per_sec"] for r in measured[name] if r["round"] in ours]
        if name != names[0] and paired:
            line.update(ratio=statistics.median(ours.values()) / line["median"], ratio_min=min(paired),
                        ratio_max=max(paired))  # fmt: skip
        lines.append(line)
    return lines


def print_row(row: dict) -> None:
    """One measurement as it comes, in words."""
    if not row.get("name"):
        print(f"round {row['round']}: {row['note']}", flush=True)
        return
    figures = (
        f"{row['tokens_per_sec']:>11,.0f} tokens/s {row['step_ms']:>7.1f} ms/step"
        + (f" {row['peak_mem_gib']:>6.2f} GiB" if row["peak_mem_gib"] is not None else "")
        + (f"  MFU {100 * row['mfu']:.1f}%" if row["mfu"] else "")
        if row["tokens_per_sec"]
        else row["note"]
    )
    print(f"round {row['round']}  {row['name']:<40} {figures}  ({row['seconds']:.1f} s)", flush=True)


def print_table(rows: list[dict], header: str) -> None:
    print(f"\n{header}")
    print(f"{'configuration':<40} {'rounds':>6} {'tokens/s':>10} {'min - max':>19} {'step ms':>8} "
          f"{'peak GiB':>8} {'MFU':>6}  lmforge / this (rounds' range)")  # fmt: skip
    for line in summarise(rows):
        if line["median"] is None:
            print(f"{line['name']:<40} {0:>6}  {line['note']}")
            continue
        spread = f"{line['min']:,.0f} - {line['max']:,.0f}"
        memory = f"{line['peak_mem_gib']:.2f}" if line["peak_mem_gib"] is not None else "-"
        mfu = f"{100 * line['mfu']:.1f}%" if line["mfu"] else "-"
        ratio = (
            f"{line['ratio']:.2f}x ({line['ratio_min']:.2f} - {line['ratio_max']:.2f})"
            if line["ratio"]
            else ""
        )
        print(f"{line['name']:<40} {line['rounds']:>6} {line['median']:>10,.0f} {spread:>19} "
              f"{line['step_ms']:>8.1f} {memory:>8} {mfu:>6}  {ratio}".rstrip())  # fmt: skip
    for row in rows:
        if not row.get("name"):  # rounds skipped for the budget
            print(row["note"])


class Terminated(BaseException):
    """SIGTERM (the time limit's `timeout`): ends the rounds; the table of what was measured follows."""


def _terminate(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # `timeout` signals this process, then its group
    raise Terminated()


def main() -> None:
    started = time.perf_counter()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="alternate the configurations this many times")
    parser.add_argument("--steps", type=int, help="timed steps per measurement (default 40; 2 with --smoke)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default 8; 1 with --smoke)")
    parser.add_argument("--batch-size", type=int, help="sequences per step (default 16; 4 with --smoke)")
    parser.add_argument("--seq-len", type=int, help="default 1024; 64 with --smoke")
    parser.add_argument("--budget-s", type=float, help="start no round expected to end after S seconds")
    parser.add_argument("--results", type=Path, help="append each row to DIR/gpt2_vs_hf.jsonl as measured")
    parser.add_argument("--smoke", action="store_true", help="CPU, debug GPT-2, eager: checks the script")
    args = parser.parse_args()
    for name, (full, smoke) in SIZES.items():
        if getattr(args, name) is None:
            setattr(args, name, smoke if args.smoke else full)
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu_bench.py needs a CUDA GPU (or --smoke)")
    try:
        import transformers

        hf_version = f"transformers {transformers.__version__}"
    except ImportError:
        hf_version = "transformers not installed"
    device = "cpu (--smoke)" if args.smoke else torch.cuda.get_device_name()
    header = (f"{device}  torch {torch.__version__}  {hf_version}  batch {args.batch_size} x seq {args.seq_len}, "
              f"{args.steps} timed steps after {args.warmup}, {args.rounds} round(s)")  # fmt: skip
    print(header, flush=True)

    rows: list[dict] = []
    results = None
    if args.results is not None:
        args.results.mkdir(parents=True, exist_ok=True)
        results = args.results / "gpt2_vs_hf.jsonl"
        with open(results, "a") as f:
            f.write(json.dumps({"run": header, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}) + "\n")

    def record(row: dict) -> None:
        # SIGTERM waits until the row is kept in all three places: the table, the file and the log.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        try:
            rows.append(row)
            if results is not None:
                with open(results, "a") as f:
                    f.write(json.dumps(row) + "\n")
            print_row(row)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})

    signal.signal(signal.SIGTERM, _terminate)
    try:
        run_rounds(configurations(args), args.rounds, args.budget_s, started, record)
    except Terminated:
        print(
            f"terminated (SIGTERM) {time.perf_counter() - started:.0f} s in; what was measured:", flush=True
        )
    print_table(rows, header + f"  ({time.perf_counter() - started:.0f} s in all)")
    sys.stdout.flush()


if __name__ == "__main__":
    main()

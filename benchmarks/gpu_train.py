"""Every training-speed measurement of issues 3 and 5 on one GPU; prints a table last.

    python benchmarks/gpu_train.py [--parts gpt2,llama1b,switches,scale,host_sync,fp8_loss,speedrun]
                                   [--results DIR] [--deadline-s S]
    python benchmarks/gpu_train.py --table DIR/rows.jsonl     # the table of an earlier (or killed) run

Parts (each prints its rows as JSON lines as it goes, and its duration):
  gpt2       lmforge gpt2 124m (seq 1024, bf16, compiled blocks) beside Hugging Face transformers'
             GPT2LMHeadModel of the same shape, eager and compiled (benchmarks/gpu_bench.py).
  llama1b    llama 1b flavor, micro-batch 8 x 2048, bf16, AdamW: activation checkpointing none /
             selective / full (tokens/s and peak memory), and float8 (torchao) without it.
  switches   llama 124m flavor, 16 x 1024: each speed switch against compiled blocks (the default):
             eager, one whole-model graph, CUDA graphs, fused projections, the unfused loss.
  scale      llama 1b flavor, 8 x 2048, bf16 (issue 3, point 6): what FSDP2 and the pipeline schedules
             cost on one GPU, wrapped as pretraining wraps them but on a process group of one
             (`lmforge bench --layout`). FSDP2 (eager, without resharding, compiled) against the plain
             model; GPipe, 1F1B and interleaved 1F1B over 4 micro-batches against plain gradient
             accumulation over the same 4 (unfused loss, eager: pipeline stages are not compiled).
             Each row's note gives its last loss: the same weights and tokens in every configuration.
  host_sync  `lmforge pretrain` of gpt2 124m reading the step flags every step (train.check_every=1)
             against every logging step (the default with a fused AdamW): tokens/s from metrics.jsonl.
  fp8_loss   `lmforge pretrain` of llama 1b for 200 steps on the speedrun corpus, bf16 then float8:
             tokens/s and the loss after 200 steps (mean of the last 20 steps).
  corpus     waits for the corpus of the three parts below (prepared in the background from the
             start) and reports its size in tokens; a later call on the same machine reuses it.
  speedrun   benchmarks/speedrun.py: the fast recipe's wall time to the baseline's final validation
             loss, the baseline sized to --baseline-minutes of training on this GPU.

The corpus of host_sync, fp8_loss and speedrun is prepared in a background process from the start,
while the GPU parts run. A configuration that fails (out of memory, a compile error, a failed
pretraining run) becomes a row saying so, and the run goes on; one not started --deadline-s seconds
after the start becomes a row saying it was skipped. Each row is appended to RESULTS/rows.jsonl as it
comes, and each pretraining run's metrics.jsonl is copied to RESULTS/, so a run killed at a time limit
keeps what it measured (`--table` prints it).

The lent GPU machine runs one command for at most 10 minutes, and all parts take about half an hour
(docs/speed.md, "Time budget"), so benchmarks/gpu_session.sh runs them as optional calls of one or two
parts each, most value per minute first, after its first call (GPT-2 124M against Hugging Face with
benchmarks/gpu_bench.py in alternated rounds, then pytest -m gpu). The part gpt2 here is that
comparison once, without rounds: no optional call runs it.

MFU = (6N + attention FLOPs per token) x tokens/s / 989e12 (H100 SXM dense bf16), as `lmforge bench`.
Record the table in benchmarks/RESULTS.md with the device, date and commit.
--smoke runs every part on a CPU with debug-sized models in a minute or two, to check the script.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # gpu_bench, speedrun: scripts beside this one

from gpu_bench import bench_hf, hf_name  # noqa: E402
from speedrun import baseline_speed, baseline_steps_for, corpus_summary, prepare_command, run_recipe  # noqa: E402
from speedrun import print_table as print_speedrun  # noqa: E402
from speedrun import speedrun as race  # noqa: E402

from lmforge.bench import bench, interleaving_on_one_process  # noqa: E402
from lmforge.models import model_config  # noqa: E402

PARTS = ("gpt2", "llama1b", "switches", "scale", "corpus", "host_sync", "fp8_loss", "speedrun")
CORPUS_PARTS = ("corpus", "host_sync", "fp8_loss", "speedrun")


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

    def bench(self, family: str, flavor: str, batch: int, seq: int, **switches) -> Callable[[], dict]:
        """A thunk that runs `lmforge bench` on this configuration (for `Runner.measure`)."""
        switches.setdefault("compile", self.compile)
        return lambda: bench(family, flavor, batch, seq, self.steps, self.warmup, self.precision,
                             device=self.device, **switches)  # fmt: skip


def _free() -> None:
    gc.collect()
    torch.compiler.reset()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _one_line(err: BaseException) -> str:
    """An error as one line: its first line, and its last (a failed subprocess's own error line)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
    text = lines[0] if len(lines) == 1 else f"{lines[0][:100]} ... {lines[-1]}"
    return f"{type(err).__name__}: {text[:300]}"


class Runner:
    """Runs configurations one by one and keeps their rows.

    A configuration that raises becomes a row with note "error: ...", and one not started before
    the deadline a row with note "skipped: ..."; either way the run goes on to the next. Each row is
    printed as a JSON line and appended to RESULTS/rows.jsonl when it is measured.
    """

    def __init__(self, results: Path, deadline_s: float | None):
        self.results = results
        self.deadline_s = deadline_s
        self.started = time.perf_counter()
        self.rows: list[dict] = []
        results.mkdir(parents=True, exist_ok=True)

    def past_deadline(self) -> bool:
        return self.deadline_s is not None and time.perf_counter() - self.started > self.deadline_s

    def attempt(self, thunk: Callable[[], dict]) -> tuple[dict, str]:
        """`thunk()` and "", or {} and why there is no result."""
        if self.past_deadline():
            return {}, f"skipped: not started within --deadline-s {self.deadline_s:g}"
        try:
            return thunk(), ""
        except (Exception, SystemExit) as err:  # recorded, and the next configuration runs
            return {}, f"error: {_one_line(err)}"
        finally:
            _free()

    def measure(self, part: str, name: str, thunk: Callable[[], dict], reference: float | None = None,
                note: str = "") -> dict:  # fmt: skip
        """Run one configuration, record its row (tokens/s relative to `reference`); its result."""
        result, failure = self.attempt(thunk)
        self.add(_row(part, name, result, reference, failure or note))
        return result

    def add(self, row: dict) -> None:
        self.rows.append(row)
        print(json.dumps(row), flush=True)
        with open(self.results / "rows.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")

    def keep_metrics(self, run_dir: Path) -> None:
        """Copy a pretraining run's metrics.jsonl beside the rows (run directories stay in --out)."""
        if (run_dir / "metrics.jsonl").is_file():
            shutil.copyfile(run_dir / "metrics.jsonl", self.results / f"{run_dir.name}.metrics.jsonl")


class Corpus:
    """The pretraining parts' corpus: `lmforge data prepare` in a background process, started at once
    so that it runs while the GPU parts do; `summary()` waits for it. An existing one is reused."""

    def __init__(self, data_dir: Path, source: str, vocab_size: int):
        self.data_dir = data_dir
        self.process = None
        if not (data_dir / "manifest.json").is_file():
            data_dir.parent.mkdir(parents=True, exist_ok=True)
            self.log = data_dir.parent / "prepare.log"
            # Leaves 4 cores to the benchmark process and Inductor's compile workers.
            workers = max(1, (os.cpu_count() or 2) - 4)
            command = [
                sys.executable,
                "-m",
                "lmforge",
                *prepare_command(data_dir, source, vocab_size, workers),
            ]
            env = {**os.environ, "RAYON_NUM_THREADS": str(workers)}  # the tokenizer's training threads
            with open(self.log, "w") as log:
                self.process = subprocess.Popen(
                    command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
                )

    def summary(self) -> dict:
        if self.process is not None and self.process.wait() != 0:
            lines = self.log.read_text().strip().splitlines() or ["(no output)"]
            raise SystemExit(f"corpus preparation failed (log: {self.log}): {lines[-1]}")
        return corpus_summary(self.data_dir)

    def stop(self) -> None:
        """Kill an unfinished preparation with its tokenizer workers (its own process group)."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


class Terminated(BaseException):
    """SIGTERM (a time limit's `timeout`): not a configuration's failure; ends the run, table printed."""


def _terminate(signum, frame) -> None:
    # Once: `timeout` signals this process and then its group, and a second Terminated raised while
    # the first unwinds would skip the clean-up (killing the child run, copying its metrics).
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated()


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


def part_gpt2(s: Settings, run: Runner) -> None:
    ours = run.measure("gpt2", f"lmforge gpt2-{s.small} {s.precision} {s.compiled}", s.bench("gpt2", s.small, s.batch_small, s.seq_small))  # fmt: skip
    if s.smoke:
        return  # bench_hf needs CUDA
    for compile in (False, True):
        hf = run.attempt(
            lambda compile=compile: bench_hf(s.batch_small, s.seq_small, s.steps, s.warmup, compile)
        )
        name = hf[0].get("name", hf_name(compile, s.precision))
        row = _row("gpt2", name, hf[0], note=hf[1] or "ratio: lmforge / this")
        if ours.get("tokens_per_sec") and hf[0]:
            row["ratio"] = ours["tokens_per_sec"] / hf[0]["tokens_per_sec"]
        run.add(row)


def part_llama1b(s: Settings, run: Runner) -> None:
    reference = None  # AC none's tokens/s; if it failed, the other rows have no ratio
    for ac in ("none", "selective", "full"):
        result = run.measure("llama1b", f"llama-{s.big} {s.precision} AC {ac}",
                             s.bench("llama", s.big, s.batch_big, s.seq_big, activation_checkpointing=ac), reference)  # fmt: skip
        reference = result.get("tokens_per_sec") if ac == "none" else reference
    if not s.smoke and torch.cuda.get_device_capability() >= (8, 9):
        run.measure("llama1b", f"llama-{s.big} float8 AC none",
                    s.bench("llama", s.big, s.batch_big, s.seq_big, float8=True), reference)  # fmt: skip
    else:
        run.add(
            _row("llama1b", f"llama-{s.big} float8", {}, note="skipped: needs a GPU of capability >= 8.9")
        )


def part_switches(s: Settings, run: Runner) -> None:
    base = run.measure(
        "switches", f"{s.compiled} (reference)", s.bench("llama", s.small, s.batch_small, s.seq_small)
    )
    reference = base.get("tokens_per_sec")
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
        run.measure(
            "switches", name, s.bench("llama", s.small, s.batch_small, s.seq_small, **switches), reference
        )


def part_scale(s: Settings, run: Runner) -> None:
    shape = ("llama", s.big, s.batch_big, s.seq_big)

    def measure(name: str, reference: float | None, note: str = "", **switches) -> float | None:
        result, failure = run.attempt(s.bench(*shape, **switches))
        run.add(_row("scale", name, result, reference, failure or f"loss {result['loss']:.4f}{note}"))
        return result.get("tokens_per_sec")

    eager = measure(f"llama-{s.big} plain, eager (reference)", None, compile=False)
    measure("FSDP2 on 1 GPU, eager", eager, layout="fsdp", compile=False)
    measure("FSDP2, no reshard after forward, eager", eager, layout="fsdp", compile=False,
            fsdp_reshard_after_forward=False)  # fmt: skip
    if s.compile:
        compiled = measure(f"plain, {s.compiled} (reference)", None)
        measure(f"FSDP2 on 1 GPU, {s.compiled}", compiled, layout="fsdp")
    n = 4
    accumulation = measure(f"plain, {n} micro-batches, unfused loss (reference)", None, microbatches=n,
                           fused_loss=False, compile=False)  # fmt: skip
    # With both stages on one process, a tied embedding/head weight is two copies (one per stage),
    # each with its own gradient and AdamW state: a cost of this one-process set-up, not of the schedule.
    tied = model_config("llama", s.big).tie_embeddings
    for schedule in ("gpipe", "1f1b", "interleaved_1f1b"):
        if schedule == "interleaved_1f1b" and not interleaving_on_one_process():
            why = f"skipped: torch {torch.__version__} cannot run both stages on one process (needs >= 2.13)"
            run.add(_row("scale", f"pipeline {schedule}, {n} micro-batches", {}, note=why))
            continue
        note = "; 2 copies of the tied embedding" if tied and schedule == "interleaved_1f1b" else ""
        measure(f"pipeline {schedule}, {n} micro-batches", accumulation, note, layout="pipeline",
                pp_schedule=schedule, microbatches=n, compile=False)  # fmt: skip


def _pretrain_throughput(records: list[dict], skip: int) -> float:
    """Mean tokens/s of the logged steps after the first `skip` (compilation, warm-up)."""
    values = [r["tokens_per_sec"] for r in records if "tokens_per_sec" in r and r["step"] > skip]
    return sum(values) / len(values)


def _pretrain(s: Settings, run: Runner, recipe: str, name: str, data_dir: str, *overrides: str) -> list[dict]:
    """`run_recipe` into OUT/name, its metrics.jsonl kept beside the rows; its records."""
    try:
        return run_recipe(recipe, s.out / name, data_dir, *s.pretrain_extra, *overrides)
    finally:
        run.keep_metrics(s.out / name)


def part_corpus(s: Settings, run: Runner, corpus: Corpus) -> None:
    def measure() -> dict:
        summary = corpus.summary()
        tokens = summary["tokens"]
        documents = sum(summary["documents"].values())
        return {"note": f"{summary['source']}: {documents:,} documents, {tokens['train']:,} train "
                        f"+ {tokens['val']:,} validation tokens at vocab {summary['vocab_size']}"}  # fmt: skip

    result, failure = run.attempt(measure)
    run.add(_row("corpus", "speedrun corpus", {}, note=failure or result["note"]))


def part_host_sync(s: Settings, run: Runner, corpus: Corpus) -> None:
    reference = None
    steps = 20 if s.smoke else 120
    for check_every in (1, 10):

        def measure(check_every=check_every) -> dict:
            records = _pretrain(
                s, run, "speedrun-baseline", f"host_sync_{check_every}", corpus.summary()["dir"],
                f"--train.max_steps={steps}", "--train.eval_every=0", "--train.eval_batches=1",
                "--logging.log_every=10", f"--train.check_every={check_every}", "--optim.fused=true",
                "--train.global_batch_tokens=null", "--checkpoint.enabled=false",
            )  # fmt: skip
            return {"tokens_per_sec": _pretrain_throughput(records, skip=steps // 3)}

        result = run.measure("host_sync", f"pretrain gpt2 check_every={check_every}", measure, reference)
        reference = result.get("tokens_per_sec") if check_every == 1 else reference


def part_fp8_loss(s: Settings, run: Runner, corpus: Corpus) -> None:
    if not s.smoke and torch.cuda.get_device_capability() < (8, 9):
        run.add(
            _row("fp8_loss", "float8 loss tracking", {}, note="skipped: needs a GPU of capability >= 8.9")
        )
        return
    reference, reference_loss = None, None
    for float8 in (False,) if s.smoke else (False, True):  # float8 refuses a CPU
        losses: list[float] = []

        def measure(float8=float8, losses=losses) -> dict:
            records = _pretrain(
                s, run, "llama-1b", f"fp8_loss_{'float8' if float8 else 'bf16'}", corpus.summary()["dir"],
                f"--train.max_steps={s.fp8_steps}", "--train.eval_every=0", "--train.eval_batches=1",
                "--train.sample_tokens=0", "--logging.log_every=1", "--schedule.warmup_steps=20",
                f"--train.micro_batch_size={s.batch_big}", "--train.global_batch_tokens=null",
                "--checkpoint.enabled=false", *(["--train.float8=true"] if float8 else []),
            )  # fmt: skip
            losses.extend(r["loss"] for r in records if "loss" in r)
            return {"tokens_per_sec": _pretrain_throughput(records, skip=s.fp8_steps // 10)}

        name = f"pretrain llama-{s.big} {'float8' if float8 else 'bf16'}"
        result, failure = run.attempt(measure)
        notes = [failure] if failure else []
        if losses:
            final_loss = sum(losses[-20:]) / len(losses[-20:])
            if not float8:  # the bf16 run is the reference; if it failed, float8 has nothing to track
                reference_loss = final_loss
            versus = f" ({100 * (final_loss / reference_loss - 1):+.2f}% vs bf16)" if reference_loss else ""
            notes.insert(0, f"loss@{len(losses)} {final_loss:.4f}{versus}")
        run.add(_row("fp8_loss", name, result, reference, "; ".join(notes)))
        reference = result.get("tokens_per_sec") if not float8 else reference


def part_speedrun(
    s: Settings, run: Runner, corpus: Corpus, baseline_steps: int | None, minutes: float
) -> dict:
    """The race; its result (or {"error": ...}) as the row of part speedrun."""

    def measure() -> dict:
        for name in (
            "baseline",
            "fast",
        ):  # an earlier run's, which keep_metrics must not pass off as this one's
            shutil.rmtree(s.out / "speedrun" / name, ignore_errors=True)
        summary = corpus.summary()
        # Measured at the corpus's vocabulary, not the gpt2 part's; the blocks' compiled graphs are
        # the gpt2 part's, from Inductor's cache.
        steps = baseline_steps or baseline_steps_for(minutes, baseline_speed(s.device, summary["vocab_size"]))
        try:
            return race(s.out / "speedrun", summary, steps, steps // 2, s.smoke, s.device)
        finally:
            for name in ("baseline", "fast"):
                run.keep_metrics(s.out / "speedrun" / name)

    result, failure = run.attempt(measure)
    row = {"part": "speedrun", **result} if result else {"part": "speedrun", "note": failure}
    run.add(row)
    return row


def _run_row(parts: list[str]) -> dict:
    """The first row of a run: where and when it was measured (--table prints it from the file)."""
    return {
        "part": "run",
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "parts": parts,
    }


def print_table(rows: list[dict], durations: dict[str, float]) -> None:
    runs = [row for row in rows if row["part"] == "run"] or [_run_row([])]
    header = f"\n{runs[0]['device']}  torch {runs[0]['torch']}  started {runs[0]['started']}"
    print(header + "  parts: " + ", ".join(f"{p} {t:.0f}s" for p, t in durations.items()))
    print(
        f"{'part':<10} {'configuration':<44} {'tokens/s':>11} {'MFU':>6} {'peak GiB':>9} {'ratio':>6}  note"
    )
    for row in rows:
        if row["part"] == "run" and row is not runs[0]:  # several runs appended to one rows.jsonl
            print(f"-- run started {row['started']} on {row['device']}, torch {row['torch']}")
        if row["part"] in ("run", "speedrun"):
            continue
        tokens = f"{row['tokens_per_sec']:,.0f}" if row["tokens_per_sec"] else "-"
        mfu = f"{100 * row['mfu']:.1f}%" if row["mfu"] else "-"
        memory = f"{row['peak_mem_gib']:.1f}" if row["peak_mem_gib"] else "-"
        ratio = f"{row['ratio']:.2f}x" if row["ratio"] else "-"
        print(
            f"{row['part']:<10} {row['name']:<44} {tokens:>11} {mfu:>6} {memory:>9} {ratio:>6}  {row['note']}"
        )
    for row in rows:
        if row["part"] == "speedrun":
            print_speedrun(row) if "target_val_loss" in row else print(f"\nspeedrun: {row['note']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per `lmforge bench` configuration")
    parser.add_argument("--out", type=Path, default=Path("runs/gpu_train"), help="run directories, corpus")
    parser.add_argument("--results", type=Path, help="rows.jsonl and metrics files (default: --out)")
    parser.add_argument("--deadline-s", type=float, help="start no configuration after this many seconds")
    parser.add_argument(
        "--baseline-minutes", type=float, default=4.0, help="speedrun baseline's training time"
    )
    parser.add_argument("--baseline-steps", type=int, help="speedrun baseline's length (instead of minutes)")
    parser.add_argument("--source", default="python", help="corpus of the pretrain parts")
    parser.add_argument("--vocab-size", type=int, default=16384)
    parser.add_argument("--smoke", action="store_true", help="CPU, debug-sized models: checks the script")
    parser.add_argument("--table", type=Path, help="print the table of a rows.jsonl and exit")
    args = parser.parse_args()
    if args.table is not None:
        rows = [json.loads(line) for line in args.table.read_text().splitlines() if line.strip()]
        print_table(rows, {})
        return
    parts = args.parts.split(",")
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise SystemExit(f"unknown part(s) {unknown}; parts are {', '.join(PARTS)}")
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu_train.py needs a CUDA GPU (or --smoke)")
    if args.smoke and "speedrun" in parts and args.baseline_steps is None:
        raise SystemExit("--smoke needs --baseline-steps")
    s = Settings(args.smoke, args.steps, args.out, args.vocab_size)
    run = Runner(args.results or args.out, args.deadline_s)
    run.add(_run_row(parts))
    corpus = (
        Corpus(args.out / "speedrun" / "data", args.source, args.vocab_size)
        if set(parts) & set(CORPUS_PARTS)
        else None
    )
    durations: dict[str, float] = {}
    signal.signal(signal.SIGTERM, _terminate)
    try:
        for part in parts:
            started = time.perf_counter()
            if part == "speedrun":
                part_speedrun(s, run, corpus, args.baseline_steps, args.baseline_minutes)
            elif part in CORPUS_PARTS:
                {"corpus": part_corpus, "host_sync": part_host_sync, "fp8_loss": part_fp8_loss}[part](
                    s, run, corpus
                )
            else:
                parts_by_name = {
                    "gpt2": part_gpt2,
                    "llama1b": part_llama1b,
                    "switches": part_switches,
                    "scale": part_scale,
                }
                parts_by_name[part](s, run)
            durations[part] = time.perf_counter() - started
    except Terminated:
        print(f"terminated (SIGTERM) during part {part}; the rows measured so far:", flush=True)
    finally:
        if corpus is not None:
            corpus.stop()
    print_table(run.rows, durations)


if __name__ == "__main__":
    main()

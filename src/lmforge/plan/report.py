"""What `lmforge plan` prints: a ranked table, JSON lines, and a PNG of memory and speed per layout."""

from __future__ import annotations

import json
import math
from pathlib import Path

from lmforge.errors import ConfigError
from lmforge.plan.planner import Estimate, Job


def _si(x: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def header(job: Job, n_params: int) -> str:
    d = job.device
    lines = [
        f"model: {type(job.model).__name__} dim {job.model.dim}, {job.model.n_layers} layers, "
        f"{_si(n_params)} params; {job.n_gpus} x {d.name} ({d.memory_gib:.1f} GiB, "
        f"{d.bf16_flops / 1e12:.0f} TFLOP/s bf16); seq {job.seq_len}, global batch {job.global_batch} sequences "
        f"({_si(job.global_batch_tokens)} tokens)"
    ]
    if job.tokens:
        lines.append(f"token budget {_si(job.tokens)}" + (
            f", ${job.price_per_gpu_hour:.2f} per GPU-hour" if job.price_per_gpu_hour is not None else ""
        ))  # fmt: skip
    return "\n".join(lines)


def table(estimates: list[Estimate], top: int) -> str:
    """The ranked layouts (fastest fitting first); the first fitting one is the recommendation."""
    rows = [["", "#", "layout", "mem GiB", "fits", "param+grad+opt", "activ", "comm buf", "step s", "compute",
             "exposed comm", "bubble", "tokens/s", "TFLOP/s", "MFU", "days", "GPU-h", "cost"]]  # fmt: skip
    recommended = next((e for e in estimates if e.fits), None)
    for i, e in enumerate(estimates[:top], 1):
        m, s = e.memory, e.step
        rows.append([
            "*" if e is recommended else "", str(i), e.layout.describe(e.grad_accum), f"{e.memory_gib_per_gpu:.1f}",
            "yes" if e.fits else "NO", f"{m['parameters'] + m['gradients'] + m['optimizer']:.1f}",
            f"{m['activations']:.1f}", f"{m['communication']:.1f}", f"{e.step_time_s:.3f}", f"{s['compute'] + s['elementwise']:.3f}",
            f"{e.exposed_comm_s:.3f}", f"{s['bubble']:.3f}",
            _si(e.tokens_per_sec), f"{e.tflops_per_gpu:.0f}", f"{e.mfu:.1%}",
            "" if e.days is None else f"{e.days:.1f}", "" if e.gpu_hours is None else _si(e.gpu_hours),
            "" if e.cost is None else "$" + _si(e.cost),
        ])  # fmt: skip
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    text = ["  ".join(cell.ljust(w) if c < 3 else cell.rjust(w) for c, (cell, w) in enumerate(zip(r, widths, strict=False)))
            for r in rows]  # fmt: skip
    if recommended is not None:
        text.append(
            f"* recommended: {recommended.layout.describe(recommended.grad_accum)} (the fastest layout that fits)"
        )
        text.extend(breakdown(recommended))
    shown = min(top, len(estimates))
    text.append(f"{shown} of {len(estimates)} layouts shown; --top N shows more, --json all of them")
    return "\n".join(text)


def breakdown(e: Estimate) -> list[str]:
    """Every part of one layout's memory and step time, and the pretrain overrides that run it."""
    memory = ", ".join(f"{part} {gib:.2f}" for part, gib in e.memory.items())
    step = ", ".join(f"{part} {s:.3f}" for part, s in e.step.items() if s > 0)
    return [
        f"  memory GiB per GPU: {memory}",
        f"  step s: {step}",
        "  run it with: " + " ".join(overrides(e)),
    ]


def overrides(e: Estimate) -> list[str]:
    """`lmforge pretrain` overrides for this layout: the assumptions of its estimate made explicit."""
    layout, seq = e.layout, e.job.seq_len
    args = [f"--parallel.dp_replicate={layout.dp_replicate}", f"--parallel.dp_shard={layout.dp_shard}",
            f"--parallel.tp={layout.tp}", f"--parallel.pp={layout.pp}", f"--data.seq_len={seq}",
            f"--train.micro_batch_size={layout.micro_batch}", f"--train.global_batch_tokens={e.job.global_batch_tokens}",
            f"--train.activation_checkpointing={layout.ac}", "--train.precision=bf16"]  # fmt: skip
    if layout.pp > 1:
        # the pipeline batch in micro-batches of micro_batch; FSDP keeps each stage gathered
        args += [f"--parallel.pp_schedule={layout.pp_schedule}", f"--parallel.pp_microbatches={e.grad_accum}",
                 "--parallel.sequence_parallel=false"]  # fmt: skip
        if layout.dp_shard > 1:
            args.append("--parallel.fsdp_reshard_after_forward=false")
    if layout.precision == "fp8":
        args.append("--train.float8=true")
    return args


def json_lines(estimates: list[Estimate]) -> str:
    recommended = next((e for e in estimates if e.fits), None)
    return "\n".join(
        json.dumps({**e.as_dict(), "recommended": e is recommended, "pretrain_overrides": overrides(e)})
        for e in estimates
    )


def plot(estimates: list[Estimate], path: str | Path, capacity_gib: float) -> None:
    """Memory per GPU and tokens/s of each candidate, in ranked order, with the device's memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = estimates[: max(1, min(len(estimates), 40))]
    x = range(len(shown))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(8, len(shown) * 0.3), 7), sharex=True)
    colours = ["tab:green" if e.fits else "tab:red" for e in shown]
    top.bar(x, [e.memory_gib_per_gpu for e in shown], color=colours)
    top.axhline(capacity_gib, color="black", linestyle="--", label=f"device memory {capacity_gib:.0f} GiB")
    top.set_ylabel("memory per GPU (GiB)")
    top.legend()
    bottom.bar(x, [e.tokens_per_sec for e in shown], color=colours)
    bottom.set_ylabel("tokens/s")
    bottom.set_xticks(list(x), [e.layout.describe() for e in shown], rotation=90, fontsize=7)
    top.set_title("lmforge plan: green fits, red does not (ranked: fastest fitting first)")
    fig.tight_layout()
    tmp = Path(path).with_name(Path(path).name + ".tmp.png")
    try:
        fig.savefig(tmp, dpi=100)
        tmp.replace(path)  # never a half-written PNG under the asked name
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise ConfigError(f"--plot {path}: {err.strerror or err}") from None
    finally:
        plt.close(fig)


def smallest_cluster_line(n: int | None, job: Job) -> str:
    if n is None:
        return f"the model fits on no cluster of {job.device.name} up to {2**17} GPUs at this batch"
    return (
        f"no layout fits in {job.device.memory_gib:.1f} GiB per GPU on {job.n_gpus} x {job.device.name}; "
        f"the smallest cluster that fits: {n} GPUs ({math.ceil(n / job.device.gpus_per_node)} nodes)"
    )

"""The compression report: what each variant of a model costs in quality and buys in size and speed.

For the baseline and each variant (a quantized, pruned or distilled run directory):
  params              the model's parameters (a pruned model's nonzero ones beside them)
  bytes               the checkpoint's weight files on disk
  val_loss, ppl       next-token loss and perplexity on the baseline's validation windows (the same
                      windows for every variant, fp32 compute)
  eval_tokens_per_s   a batched forward (evaluation, prefill): batch x seq_len tokens per call
  decode_tokens_per_s batch-1 greedy generation with the KV cache (what serving one user reads)

Speeds are measured in one process, side by side: every model is loaded first, then each round runs
every variant once, in turn, so that a change of the machine's state (another process, the clock
ramping) falls on all of them alike; the median over rounds is reported with the spread (min-max).
The table goes to report.md, the figures to report.json, and perplexity against bytes and against
speed to pareto.png.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from tokenizers import Tokenizer
from torch import nn

from lmforge.config import load_config
from lmforge.data.loader import val_batches
from lmforge.errors import ConfigError
from lmforge.evaluate.perplexity import evaluate_loss
from lmforge.infer.generate import generate
from lmforge.models import FamilyModel
from lmforge.rundir import (
    data_dir_for,
    decode_precision,
    meta_model,
    resolve_checkpoint,
    run_precision,
    sha256_file,
)
from lmforge.runtime import PRECISION_NAMES, autocast

Loader = Callable[[Path, torch.device], tuple[FamilyModel, Tokenizer]]


@dataclass
class Variant:
    name: str
    checkpoint: str
    method: str  # baseline, quantize int8-weight, prune magnitude 0.5, distill, ...
    params: int
    nonzero_params: int | None
    bytes: int
    val_loss: float = math.nan
    ppl: float = math.nan
    eval_tokens_per_s: float = math.nan
    eval_spread: tuple[float, float] = (math.nan, math.nan)
    decode_tokens_per_s: float = math.nan
    decode_spread: tuple[float, float] = (math.nan, math.nan)
    compute: str = ""  # the dtypes evaluation and decoding compute in, e.g. "bf16 / fp32"
    extra: dict = field(default_factory=dict)


def describe(ckpt_dir: Path) -> str:
    """What made the checkpoint's model, from its config's compress and distill sections."""
    cfg = load_config(ckpt_dir / "config.yaml")
    parts = []
    if cfg.compress.prune:
        parts.append(f"prune {cfg.compress.prune} {cfg.compress.sparsity:g}")
    if cfg.train.init and cfg.compress.prune:
        parts.append("+ recovery")
    if cfg.compress.quantize:
        group = f" g{cfg.compress.group_size}" if cfg.compress.group_size else ""
        parts.append(f"quantize {cfg.compress.quantize}{group}")
    if cfg.qat.scheme != "none":
        parts.append(f"qat {cfg.qat.scheme}")
    if cfg.distill.teacher:
        parts.append(f"distill (alpha {cfg.distill.alpha:g}, T {cfg.distill.temperature:g})")
    return " ".join(parts) or "baseline"


def weight_bytes(ckpt_dir: Path) -> int:
    return sum(f.stat().st_size for f in (ckpt_dir / "model").glob("*.safetensors"))


def nonzero_count(ckpt_dir: Path) -> int:
    """Nonzero elements of a (plain, unquantized) checkpoint's weights."""
    count = 0
    for file in sorted((ckpt_dir / "model").glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a dict
                count += int(torch.count_nonzero(f.get_tensor(key)))
    return count


def baseline_batches(
    baseline: Path, batch_size: int, max_batches: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The validation windows of the baseline run's data (RUN/data or its data.dir)."""
    ckpt_dir = resolve_checkpoint(baseline)
    cfg = load_config(ckpt_dir / "config.yaml")
    run_dir = baseline if (baseline / "checkpoints").is_dir() else ckpt_dir.parent.parent
    data_dir = data_dir_for(cfg.data, run_dir)
    if not (data_dir / "manifest.json").is_file():
        raise ConfigError(
            f"the baseline's data directory {data_dir} is missing: the report evaluates on its val split"
        )
    return val_batches(data_dir, batch_size, cfg.data.seq_len, max_batches)


def _median_and_spread(values: list[float]) -> tuple[float, tuple[float, float]]:
    return statistics.median(values), (min(values), max(values))


@torch.no_grad()
def _eval_call(model: nn.Module, tokens: torch.Tensor, dtype: torch.dtype) -> None:
    with autocast(tokens.device, dtype):
        model(tokens)


def _decode_call(model: FamilyModel, prompt: list[int], new_tokens: int, dtype: torch.dtype) -> int:
    return sum(1 for _ in generate(model, prompt, new_tokens, temperature=0.0, dtype=dtype))


def measure(
    runs: list[Path],
    load: Loader,
    device: torch.device,
    rounds: int = 3,
    eval_batch: int = 4,
    eval_batches: int = 20,
    prompt_tokens: int = 32,
    new_tokens: int = 128,
) -> list[Variant]:
    """The report's rows, the baseline (runs[0]) first. Quality on `eval_batches` validation batches of
    `eval_batch` windows, in fp32; speed over `rounds` alternated rounds (each after one warm-up
    call), each variant computing as users run it: evaluation in its run's precision on `device`
    (`lmforge eval`), decoding in decode_precision (`lmforge generate`: fp32 on a CPU, except a
    weight-only quantized model, which keeps the run's precision: its kernels compute in bf16)."""
    ckpt_dirs = [resolve_checkpoint(r) for r in runs]
    tokenizer_sha = sha256_file(ckpt_dirs[0] / "tokenizer.json")
    for run, ckpt_dir in zip(runs, ckpt_dirs, strict=True):
        if sha256_file(ckpt_dir / "tokenizer.json") != tokenizer_sha:
            raise ConfigError(
                f"{run} has another tokenizer than the baseline {runs[0]}: their losses do not compare"
            )
    batches = baseline_batches(runs[0], eval_batch, eval_batches)
    models, variants, dtypes = [], [], []
    for run, ckpt_dir in zip(runs, ckpt_dirs, strict=True):
        model, _ = load(ckpt_dir, device)
        dtypes.append((run_precision(ckpt_dir, device), decode_precision(ckpt_dir, device)))
        cfg = load_config(ckpt_dir / "config.yaml")
        quality = evaluate_loss(model, batches, device, torch.float32)
        variants.append(
            Variant(
                name=run.name if run.name not in ("", ".") else str(run),
                checkpoint=str(ckpt_dir),
                method=describe(ckpt_dir),
                params=meta_model(ckpt_dir).num_params(),
                nonzero_params=None if cfg.compress.quantize else nonzero_count(ckpt_dir),
                bytes=weight_bytes(ckpt_dir),
                val_loss=quality["val_loss"],
                ppl=quality["val_ppl"],
                compute=" / ".join(PRECISION_NAMES[d] for d in dtypes[-1]),
            )
        )
        models.append(model)
    eval_tokens = batches[0][0][:eval_batch].to(device)  # (B, T)
    prompt = batches[0][0][0, :prompt_tokens].tolist()
    for model, (eval_dtype, decode_dtype) in zip(models, dtypes, strict=True):  # warm-up: first-call
        _eval_call(model, eval_tokens, eval_dtype)  # allocations, lazy kernels, packed weights
        _decode_call(model, prompt, 4, decode_dtype)
    eval_times: list[list[float]] = [[] for _ in models]
    decode_rates: list[list[float]] = [[] for _ in models]
    for _ in range(rounds):
        for i, model in enumerate(models):
            eval_dtype, decode_dtype = dtypes[i]
            start = time.perf_counter()
            _eval_call(model, eval_tokens, eval_dtype)
            eval_times[i].append(eval_tokens.numel() / (time.perf_counter() - start))
            start = time.perf_counter()
            generated = _decode_call(model, prompt, new_tokens, decode_dtype)
            decode_rates[i].append(generated / (time.perf_counter() - start))
    for variant, evals, decodes in zip(variants, eval_times, decode_rates, strict=True):
        variant.eval_tokens_per_s, variant.eval_spread = _median_and_spread(evals)
        variant.decode_tokens_per_s, variant.decode_spread = _median_and_spread(decodes)
    return variants


def markdown_table(variants: list[Variant]) -> str:
    """The table, each variant's figures beside their ratio to the baseline's (the first row)."""
    base = variants[0]
    lines = [
        "| variant | method | params | bytes | x fp32 bytes | val loss | ppl | ppl vs base | compute (eval / decode) "
        "| eval tok/s | x | decode tok/s | x |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for v in variants:
        params = f"{v.params / 1e6:.2f}M"
        if v.nonzero_params is not None and v.nonzero_params < 0.99 * v.params:
            params += f" ({v.nonzero_params / 1e6:.2f}M nonzero)"
        lines.append(
            f"| {v.name} | {v.method} | {params} | {v.bytes / 1e6:.2f} MB | {v.bytes / base.bytes:.3f} | "
            f"{v.val_loss:.4f} | {v.ppl:.3f} | {100 * (v.ppl / base.ppl - 1):+.2f}% | {v.compute} | "
            f"{v.eval_tokens_per_s:,.0f} ({v.eval_spread[0]:,.0f}-{v.eval_spread[1]:,.0f}) | "
            f"{v.eval_tokens_per_s / base.eval_tokens_per_s:.2f} | "
            f"{v.decode_tokens_per_s:.1f} ({v.decode_spread[0]:.1f}-{v.decode_spread[1]:.1f}) | "
            f"{v.decode_tokens_per_s / base.decode_tokens_per_s:.2f} |"
        )
    return "\n".join(lines) + "\n"


def _pareto(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both axes (lower x, lower y), sorted by x."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    frontier, best_y = [], math.inf
    for i in order:
        if points[i][1] < best_y:
            frontier.append(i)
            best_y = points[i][1]
    return frontier


def plot_pareto(variants: list[Variant], path: Path) -> None:
    """Two panels: perplexity against bytes on disk, and against batch-1 decode time per token
    (1 / tokens/s, so that lower is better on both axes of both panels); the Pareto front drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    panels = [
        ("bytes on disk (MB)", [v.bytes / 1e6 for v in variants]),
        ("batch-1 decode: ms per token", [1e3 / v.decode_tokens_per_s for v in variants]),
    ]
    for ax, (label, xs) in zip(axes, panels, strict=True):
        ys = [v.ppl for v in variants]
        ax.scatter(xs, ys, color=["black"] + ["tab:blue"] * (len(variants) - 1), zorder=3)
        for v, x, y in zip(variants, xs, ys, strict=True):
            ax.annotate(v.name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        front = _pareto(list(zip(xs, ys, strict=True)))
        ax.plot(
            [xs[i] for i in front], [ys[i] for i in front], "--", color="tab:orange", label="Pareto front"
        )
        ax.set_xlabel(label)
        ax.set_ylabel("validation perplexity")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("compression trade-offs (lower left is better)")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def write_report(variants: list[Variant], out_dir: Path, context: dict) -> dict[str, Path]:
    """report.md (context, then the table), report.json and pareto.png in out_dir, each written under a
    temporary name and renamed into place."""
    out_dir.mkdir(parents=True, exist_ok=True)
    header = "\n".join(f"- {k}: {v}" for k, v in context.items())
    files = {
        "report.md": f"# Compression report\n\n{header}\n\n{markdown_table(variants)}",
        "report.json": json.dumps({"context": context, "variants": [asdict(v) for v in variants]}, indent=2),
    }
    for name, text in files.items():
        (out_dir / f".{name}.tmp").write_text(text)
        os.replace(out_dir / f".{name}.tmp", out_dir / name)
    plot_pareto(variants, out_dir / "pareto.png")
    return {name: out_dir / name for name in (*files, "pareto.png")}

"""What a run reports: a progress bar, RUN/metrics.jsonl, TensorBoard events, RUN/loss.png.

metrics.jsonl holds one JSON object per logged training step
    {"step", "loss", "lr", "grad_norm", "tokens_per_sec", "mfu", "elapsed_s", "nonfinite_steps"}
one per evaluation
    {"step", "val_loss", "val_ppl"}
and one per event, a skipped non-finite step or a rollback: {"step", "event", ...}.
Floats are written with Python's repr, so a value read back is bit-identical to the logged one.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from pathlib import Path

import torch
from tqdm import tqdm

from lmforge.config import LoggingConfig
from lmforge.errors import LmforgeError


def read_metrics(path: Path) -> list[dict]:
    """The records of a JSON-lines file; a last line cut off by a crash mid-write is dropped."""
    if not path.is_file():
        return []
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                warnings.warn(f"{path}: dropped its last line, cut off mid-write", stacklevel=2)
                break
            raise LmforgeError(f"{path} line {number} is not JSON: {line[:80]!r}") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise LmforgeError(f"{path} line {number} has no integer 'step': {line[:80]!r}")
        records.append(record)
    return records


class BatchLog:
    """RUN/batches/rank_R.jsonl: {"step", "samples"} per micro-batch on rank R, in the order trained,
    `samples` the sha256 (16 hex digits) of each sequence's input tokens. Per sequence, so that runs
    with other data-parallel degrees compare: a step's sequences over all ranks are the same set.
    A resumed run first drops what was logged after its checkpoint."""

    def __init__(self, run_dir: Path, rank: int, start_step: int, enabled: bool):
        self.file = None
        if not enabled:
            return
        path = run_dir / "batches" / f"rank_{rank}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = [r for r in read_metrics(path) if r["step"] <= start_step]
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        tmp.replace(path)
        self.file = open(path, "a")  # noqa: SIM115 - open for the whole run

    def record(self, step: int, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """Log the batch (host tensors, before they move to the device) and return it."""
        if self.file is not None:
            samples = [hashlib.sha256(row.numpy().tobytes()).hexdigest()[:16] for row in batch[0]]
            self.file.write(json.dumps({"step": step, "samples": samples}) + "\n")
            self.file.flush()
        return batch

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


class MetricsLogger:
    """Fans each record out to metrics.jsonl, TensorBoard and the progress bar."""

    def __init__(
        self, run_dir: Path, cfg: LoggingConfig, max_steps: int, start_step: int, enabled: bool = True
    ):
        """enabled=False (ranks other than 0 of a distributed run): every method does nothing."""
        self.path = run_dir / "metrics.jsonl"
        self.run_dir = run_dir
        self.cfg = cfg
        self.enabled = enabled
        if not enabled:
            return
        # A resumed run drops what was logged after its checkpoint: those steps are run again.
        kept = [r for r in read_metrics(self.path) if r["step"] <= start_step]
        tmp = self.path.with_name(".metrics.jsonl.tmp")  # a crash now must not lose the history
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        tmp.replace(self.path)
        self.file = open(self.path, "a")  # noqa: SIM115 - open for the whole run
        self.tb = None
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=start_step + 1 if start_step else None)
        self.bar = tqdm(
            total=max_steps,
            initial=start_step,
            disable=not cfg.progress,
            dynamic_ncols=True,
            unit="step",
            desc="pretrain",
        )

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    group = "val" if key.startswith("val_") else "train"
                    self.tb.add_scalar(f"{group}/{key}", value, record["step"])

    def log_train(self, record: dict) -> None:
        if not self.enabled:
            return
        self.write(record)
        postfix = {
            "loss": f"{record['loss']:.4f}",
            "lr": f"{record['lr']:.2e}",
            "tok/s": f"{record['tokens_per_sec']:,.0f}",
        }
        if record.get("mfu") is not None:
            postfix["mfu"] = f"{100 * record['mfu']:.1f}%"
        self.bar.set_postfix(postfix, refresh=False)

    def event(self, record: dict) -> None:
        """Something that happened at a step ({"step", "event", ...}): a skipped step, a rollback."""
        self.write(record)

    def log_eval(self, record: dict) -> None:
        if not self.enabled:
            return
        self.write(record)
        # An objective's own metrics (accuracy, F1, ...) follow the loss.
        extra = "".join(f"  {k} {v:.4f}" for k, v in record.items() if k.startswith("val_") and k not in
                        ("val_loss", "val_ppl") and isinstance(v, float))  # fmt: skip
        self.print(
            f"step {record['step']}: val_loss {record['val_loss']:.4f}  val_ppl {record['val_ppl']:.2f}{extra}"
        )

    def print(self, text: str) -> None:
        """Print above the progress bar without breaking it."""
        if not self.enabled:
            return
        if self.cfg.progress:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def advance(self) -> None:
        if not self.enabled:
            return
        self.bar.update(1)

    def close(self, plot: bool = True) -> None:
        """Close the files and the progress bar, then (plot and logging.plot) write RUN/loss.png.
        Idempotent: a run that failed closes without plotting, after one that ended normally did."""
        if not self.enabled or self.file.closed:
            return
        self.bar.close()
        self.file.close()
        if self.tb is not None:
            self.tb.close()
        if plot and self.cfg.plot:
            plot_run(self.run_dir)


def plot_run(run_dir: Path) -> Path:
    """RUN/loss.png: train and validation loss (top) and learning rate (bottom) by step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir / "metrics.jsonl")
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_loss" in r]
    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, height_ratios=[3, 1])
    ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss", linewidth=1)
    if val:
        ax_loss.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="val loss")
    ax_loss.set_ylabel("loss (nats/token)")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    ax_lr.plot([r["step"] for r in train], [r["lr"] for r in train], color="tab:green")
    ax_lr.set_ylabel("lr")
    ax_lr.set_xlabel("step")
    ax_lr.grid(alpha=0.3)
    fig.suptitle(run_dir.name)
    fig.tight_layout()
    path = run_dir / "loss.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

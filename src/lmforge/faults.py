"""Fault injection: make a process really die, hang, be preempted or see a NaN at a named point.

The reliability tests (tests/reliability/) set the environment variable

    LMFORGE_FAULT="POINT:ACTION[@FILTER,...][;POINT:ACTION...]"

for example `LMFORGE_FAULT="checkpoint.before_manifest:kill@step=4"` or
`LMFORGE_FAULT="train.step:stop@step=3,rank=1"`, and the code calls `fault(POINT, step)` at each
point. Nothing happens when the variable is unset (one dict lookup per call).

Points (where the code calls `fault`):
    checkpoint.mid_shard        the model's shard files are in the temporary directory, the
                                optimizer's are not (kill: the newest shard is first cut in half,
                                which is what a death in the middle of its write leaves)
    checkpoint.before_manifest  every shard and the trainer state written, the manifest not yet
    checkpoint.before_rename    the manifest written and synced, the directory not renamed
    checkpoint.during_rename    re-saving an existing step: the old directory moved aside, the
                                new one not yet in its place
    checkpoint.after_rename     the checkpoint in place, older ones not yet pruned
    train.step                  after optimizer step `step` (the step boundary)
    train.loss                  the loss of step `step`, before backward (nan: loss and gradients NaN)
    train.loss_value            the loss of step `step`, after backward (nan: the value only)
    train.grad                  the gradients of step `step`, after backward and before clipping
                                (nan: one parameter's gradient set to inf, the loss left finite;
                                not in the pipeline step)

Actions: kill (SIGKILL itself), stop (SIGSTOP itself: a hung rank), term / int (SIGTERM / SIGINT
itself: preemption, Ctrl-C), enospc (raise OSError ENOSPC: a full disk), nan (`fault` returns
True and the caller poisons its value).

Filters: step=N or step=A-B (inclusive), rank=R (the RANK variable torchrun sets), restart=K
(TORCHELASTIC_RESTART_COUNT: restart=0 fires in the first attempt of a torchrun job only).
A fault fires at most once per step in a process: a run that rolls back and trains step N again
does not see step N's injected NaN again (a transient fault, like a bad batch that is skipped).
"""

from __future__ import annotations

import errno
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path

ENV = "LMFORGE_FAULT"
POINTS = (
    "checkpoint.mid_shard",
    "checkpoint.before_manifest",
    "checkpoint.before_rename",
    "checkpoint.during_rename",
    "checkpoint.after_rename",
    "train.step",
    "train.loss",
    "train.loss_value",
    "train.grad",
)
ACTIONS = ("kill", "stop", "term", "int", "enospc", "nan")


@dataclass(frozen=True)
class Fault:
    point: str
    action: str
    filters: dict[str, tuple[int, int]] = field(default_factory=dict)  # key -> inclusive range

    def matches(self, point: str, step: int | None) -> bool:
        if point != self.point:
            return False
        current = {
            "step": step,
            "rank": int(os.environ.get("RANK", "0")),
            "restart": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")),
        }
        for key, (low, high) in self.filters.items():
            value = current[key]
            if value is None or not low <= value <= high:
                return False
        return True


def parse_faults(text: str) -> list[Fault]:
    """`LMFORGE_FAULT`'s value as Faults; a typo raises ValueError (a test must not pass vacuously)."""
    faults = []
    for spec in filter(None, (s.strip() for s in text.split(";"))):
        head, _, filter_text = spec.partition("@")
        point, _, action = head.partition(":")
        if point not in POINTS or action not in ACTIONS:
            raise ValueError(
                f"{ENV}: bad fault {spec!r} (points: {', '.join(POINTS)}; actions: {', '.join(ACTIONS)})"
            )
        filters = {}
        for item in filter(None, filter_text.split(",")):
            key, _, value = item.partition("=")
            if key not in ("step", "rank", "restart"):
                raise ValueError(f"{ENV}: bad filter {item!r} in {spec!r} (step, rank or restart)")
            low, _, high = value.partition("-")
            filters[key] = (int(low), int(high or low))
        faults.append(Fault(point, action, filters))
    return faults


_parsed: tuple[str, list[Fault]] = ("", [])
_fired: set[tuple[int, int | None]] = set()  # (index in the list, step)


def fault(point: str, step: int | None = None, shard_dir: Path | None = None) -> bool:
    """Act on a fault configured for `point` (at `step`); True when a `nan` fault fires here.

    `shard_dir`: for kill at checkpoint.mid_shard, the directory whose newest file is cut in half.
    """
    global _parsed
    text = os.environ.get(ENV, "")
    if not text:
        return False
    if _parsed[0] != text:
        _parsed = (text, parse_faults(text))
        _fired.clear()
    for index, item in enumerate(_parsed[1]):
        if not item.matches(point, step) or (index, step) in _fired:
            continue
        _fired.add((index, step))
        if item.action == "nan":
            return True
        if item.action == "enospc":
            raise OSError(errno.ENOSPC, f"No space left on device (injected by {ENV} at {point})")
        if item.action == "kill" and shard_dir is not None:
            files = sorted((p for p in shard_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_mtime)
            if files:
                os.truncate(files[-1], files[-1].stat().st_size // 2)
        sig = {"kill": signal.SIGKILL, "stop": signal.SIGSTOP, "term": signal.SIGTERM, "int": signal.SIGINT}
        os.kill(os.getpid(), sig[item.action])
    return False

"""Learning-rate schedules: linear warmup, then cosine / linear / constant / warmup-stable-decay.

The LR is a pure function of the step, recomputed every step, so there is no scheduler state to
checkpoint and a resumed run gets exactly the LR the uninterrupted run would have had.
"""

from __future__ import annotations

import math

from lmforge.config import ScheduleConfig


def lr_at(step: int, cfg: ScheduleConfig, peak_lr: float, total_steps: int) -> float:
    """LR for optimizer step `step` (0-based) of a schedule `total_steps` long."""
    min_lr = peak_lr * cfg.min_lr_ratio
    if step < cfg.warmup_steps:
        # (step + 1) so the very first update already moves the weights.
        return peak_lr * (step + 1) / cfg.warmup_steps
    if cfg.name == "constant":
        return peak_lr
    decay_start = cfg.warmup_steps
    if cfg.name == "wsd":
        # Warmup-stable-decay (Hu et al. 2024, MiniCPM): flat at the peak, then a linear
        # decay over the last `decay_fraction` of the schedule.
        decay_start = max(cfg.warmup_steps, total_steps - round(cfg.decay_fraction * total_steps))
        if step < decay_start:
            return peak_lr
    decay_steps = max(1, total_steps - decay_start)
    progress = min(1.0, (step - decay_start) / decay_steps)
    if cfg.name == "cosine":
        return min_lr + 0.5 * (peak_lr - min_lr) * (1.0 + math.cos(math.pi * progress))
    # linear and the decay phase of wsd
    return peak_lr - (peak_lr - min_lr) * progress

"""Module swaps that change how the model computes, not what it computes, applied from outside the
model right after it is built (on the meta device or not) and before TP/FSDP, activation
checkpointing and compile (the order torchtitan uses for its float8 converter)."""

from __future__ import annotations

import torch
from torch import nn

from lmforge.config import TrainConfig
from lmforge.errors import ConfigError
from lmforge.train.float8 import apply_float8, check_float8_device
from lmforge.train.fused_projections import apply_fused_projections


def convert_model(model: nn.Module, train: TrainConfig, tp: int, device: torch.device) -> None:
    """Apply `train.fused_projections` and `train.float8` to `model` (a whole model or a pipeline stage)."""
    for key, enabled in (("fused_projections", train.fused_projections), ("float8", train.float8)):
        if enabled and tp > 1:
            raise ConfigError(f"config key 'train.{key}' is not supported with parallel.tp={tp} yet")
    if train.fused_projections:
        apply_fused_projections(model)
    if train.float8:
        check_float8_device(device)
        apply_float8(model)

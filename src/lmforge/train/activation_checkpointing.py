"""Activation checkpointing, applied from outside the model: a block's activations are recomputed
in backward instead of being kept from forward (less memory, about one more forward of compute).

Modes (`train.activation_checkpointing`): `none`; `full`, every block; `selective`, every other
block (torchtitan's layer-selective option), which keeps about half the saved activations for
about half the recompute. The parameters' names do not change, so checkpoints do not either.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lmforge import models


def apply_activation_checkpointing(model: nn.Module, mode: Literal["none", "selective", "full"]) -> int:
    """Checkpoint the blocks of `model` (a whole model or a pipeline stage); returns how many."""
    if mode == "none":
        return 0
    blocks = models.blocks(model)
    every = 1 if mode == "full" else 2
    count = 0
    for name, block in blocks.items():
        if int(name) % every:  # names are the global layer indices, also on a pipeline stage
            continue
        block.forward = _checkpointed(block.forward)
        count += 1
    return count


def _checkpointed(forward):
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():  # evaluation, generation: nothing to recompute
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run

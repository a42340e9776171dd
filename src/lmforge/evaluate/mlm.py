"""Masked-language-model evaluation: the loss over the masked positions and the accuracy of the
model's top guess there."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from lmforge.ops.cross_entropy import IGNORE_INDEX, cross_entropy
from lmforge.runtime import autocast


@torch.no_grad()
def evaluate_masked_lm(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                       device: torch.device, dtype: torch.dtype = torch.float32) -> dict:  # fmt: skip
    """{"val_loss", "val_ppl", "val_accuracy", "val_masked"} over the masked positions of `batches`
    ((inputs, targets) with targets IGNORE_INDEX where nothing was masked)."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = masked = 0
    for inputs, targets in batches:
        inputs, targets = inputs.to(device), targets.to(device)
        chosen = targets != IGNORE_INDEX
        n = int(chosen.sum())
        if not n:
            continue
        with autocast(device, dtype):
            logits = model(inputs)
        loss_sum += cross_entropy(logits, targets).double() * n
        correct += int((logits.argmax(-1)[chosen] == targets[chosen]).sum())
        masked += n
    model.train(was_training)
    if not masked:
        raise ValueError("no masked positions in the evaluation batches")
    loss = loss_sum.item() / masked
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 700.0)), "val_accuracy": correct / masked,
            "val_masked": masked}  # fmt: skip

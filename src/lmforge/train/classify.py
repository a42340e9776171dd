"""Classification's objective: a head on the model (an encoder's first token or mean token, a
decoder's last real token: the families' `n_classes`), cross-entropy against labels, accuracy and macro-F1 on the
held-out split. Every example has one target, so micro-batches weigh alike. Not a pipeline
objective."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.data.classify import ClassifyLoader
from lmforge.evaluate.classify import evaluate_classifier
from lmforge.train.objective import LoaderObjective

if TYPE_CHECKING:
    from lmforge.train.step import TrainStep

Rows = tuple[Tensor, Tensor, Tensor]  # (inputs (B, T), labels (B,), pad_mask (B, T))


class Classification(LoaderObjective):
    pipeline_loss: Callable[[Tensor, Tensor], Tensor] | None = None
    by_targets = False  # one label per row

    def __init__(self, loader: ClassifyLoader, val_data: list[Rows]):
        self.loader, self.val_data = loader, val_data

    def loss(self, model: nn.Module, batch: Rows) -> Tensor:
        inputs, labels, pad_mask = batch
        return F.cross_entropy(model(inputs, pad_mask=pad_mask).float(), labels)

    def evaluate(self, step: TrainStep) -> dict:
        assert step.model is not None
        record = evaluate_classifier(step.model, self.val_data, step.device, step.dtype)
        record.pop("val_examples")
        return record

    def samples(self, step: TrainStep, at_step: int) -> list[str]:
        return []

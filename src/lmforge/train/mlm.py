"""Masked-language-model pretraining: the objective of the encoder families (FamilySpec.encoder),
on the same prepared corpus as the decoders' next-token prediction.

Batches are the corpus windows of the pretraining loader, masked by lmforge.data.mlm from (seed,
each row's index in the global stream), so resuming, or splitting the same global batch over more
ranks, masks alike. The loss is over the masked positions; evaluation reports it with the top-1
accuracy there, on validation windows masked once and for all. Not a pipeline objective.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from torch import Tensor, nn

from lmforge.data.loader import Batch, BatchLoader
from lmforge.data.mlm import Masker
from lmforge.evaluate.mlm import evaluate_masked_lm
from lmforge.ops.cross_entropy import cross_entropy
from lmforge.train.objective import LoaderObjective

if TYPE_CHECKING:
    from lmforge.train.step import TrainStep


class MaskedLM(LoaderObjective):
    pipeline_loss: Callable[[Tensor, Tensor], Tensor] | None = None
    by_targets = True  # how many positions a row masks varies

    def __init__(self, loader: BatchLoader, val_windows: list[Batch], fused_loss: bool, masker: Masker):
        self.loader, self.fused_loss, self.masker = loader, fused_loss, masker
        self.val_data = masker.batches(val_windows)

    def next_batch(self) -> Batch:
        start = self.loader.samples_seen + self.loader.rank * self.loader.batch_size  # this rank's first row
        inputs, _ = self.loader.next_batch()  # the windows themselves are the text to reconstruct
        return self.masker(inputs, list(range(start, start + len(inputs))))

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        inputs, targets = batch
        if self.fused_loss:
            return model(inputs, targets=targets)
        return cross_entropy(model(inputs), targets)

    def evaluate(self, step: TrainStep) -> dict:
        assert step.model is not None
        record = evaluate_masked_lm(step.model, self.val_data, step.device, step.dtype)
        record.pop("val_masked")
        return record

    def samples(self, step: TrainStep, at_step: int) -> list[str]:
        return []  # an encoder does not generate

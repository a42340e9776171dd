"""Masked-language-model pretraining: the objective of the encoder families (FamilySpec.encoder),
on the same prepared corpus as the decoders' next-token prediction.

Batches are the corpus windows of the pretraining loader, masked by lmforge.data.mlm from (seed,
each row's index in the global stream), so resuming, or splitting the same global batch over more
ranks, masks alike. The loss is over the masked positions; evaluation reports it with the top-1
accuracy there, on validation windows masked once and for all. Not a pipeline objective.

The tied head's gradient (BertConfig.head_gradient: batch, the default). The softmax pushes every
row of the head that is not the target away from the hidden state, a little, at every masked
position, and Adam normalises such steady small gradients up to full-size steps. A row whose token
is rarely a target (most of an 8k vocabulary in a few hundred steps) gets almost only that push, so
the rare rows drift together along one direction (Gao et al. 2019, "Representation Degeneration
Problem in Training Natural Language Generation Models"). Measured after 600 steps on the stdlib
corpus (tiny flavor): the rare rows had cosine 0.87-0.94 with the mean row, and a classifier
fine-tuned from these embeddings did worse than one trained from random weights. So the gradient
reaches only the rows of the tokens in the batch, inputs or targets (as Yu et al. 2022, "Rare
Tokens Degenerate All Tokens", gate it for rare tokens): the collapse is gone (cosine 0.02) at the
same masked-LM accuracy (docs/finetune.md). Under data parallelism "the batch" is every rank's
micro-batch of the same micro-step (an all-reduce of a vocabulary-sized mask), so 2 ranks of 4 rows
train exactly as one process of 8 does. With gradient accumulation each micro-step has its own
rows: a layout with another number of micro-batches per step trains slightly differently.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lmforge.data.loader import Batch, BatchLoader
from lmforge.data.mlm import Masker
from lmforge.evaluate.mlm import evaluate_masked_lm
from lmforge.models.bert.model import tokens_in_batch
from lmforge.ops.cross_entropy import cross_entropy
from lmforge.train.objective import LoaderObjective

if TYPE_CHECKING:
    from lmforge.train.step import TrainStep


class MaskedLM(LoaderObjective):
    pipeline_loss: Callable[[Tensor, Tensor], Tensor] | None = None
    by_targets = True  # how many positions a row masks varies

    def __init__(self, loader: BatchLoader, val_windows: list[Batch], fused_loss: bool, masker: Masker,
                 head_rows_vocab: int | None = None):  # fmt: skip
        """head_rows_vocab: the model's vocabulary size when its head's gradient reaches the batch's
        rows only (BertConfig.head_gradient "batch"): the objective then gives it every rank's rows."""
        self.loader, self.fused_loss, self.masker = loader, fused_loss, masker
        self.val_data = masker.batches(val_windows)
        self.head_rows_vocab = head_rows_vocab

    def next_batch(self) -> Batch:
        start = self.loader.samples_seen + self.loader.rank * self.loader.batch_size  # this rank's first row
        inputs, _ = self.loader.next_batch()  # the windows themselves are the text to reconstruct
        return self.masker(inputs, list(range(start, start + len(inputs))))

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        inputs, targets = batch
        vocab = self.head_rows_vocab
        rows = None if vocab is None else rows_of_every_rank(inputs, targets, vocab)
        if self.fused_loss:
            return model(inputs, targets=targets, head_rows=rows)
        return cross_entropy(model(inputs, head_rows=rows), targets)

    def evaluate(self, step: TrainStep) -> dict:
        assert step.model is not None
        record = evaluate_masked_lm(step.model, self.val_data, step.device, step.dtype)
        record.pop("val_masked")
        return record

    def samples(self, step: TrainStep, at_step: int) -> list[str]:
        return []  # an encoder does not generate


def rows_of_every_rank(inputs: Tensor, targets: Tensor, vocab_size: int) -> Tensor:
    """(vocab_size,) bool: the tokens of this micro-batch's inputs and targets (tokens_in_batch), and
    under torch.distributed of every rank's at the same micro-step (all ranks call this)."""
    rows = tokens_in_batch(inputs, targets, vocab_size)
    if dist.is_initialized() and dist.get_world_size() > 1:
        as_bytes = rows.to(torch.uint8)  # gloo and NCCL reduce bytes, not bools
        dist.all_reduce(as_bytes, op=dist.ReduceOp.MAX)
        rows = as_bytes.bool()
    return rows

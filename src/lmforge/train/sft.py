"""Supervised fine-tuning's objective: chat examples (lmforge.data.sft) with the loss on the
assistant's tokens only, packed (each example attending only to itself) or one per row, padded.

It is next-token cross-entropy like pretraining's, over the targets that are not IGNORE_INDEX;
what differs is the batches (their doc_ids) and the evaluation, a mean over the trained targets of
the validation examples. It cannot run as a pipeline (the stages do not pass doc_ids).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from tokenizers import Tokenizer
from torch import Tensor, nn

from lmforge.data.sft import CHAT_TOKENS, IGNORE_INDEX, SFTLoader
from lmforge.infer.generate import generate
from lmforge.ops.cross_entropy import cross_entropy
from lmforge.runtime import autocast
from lmforge.train.objective import LoaderObjective

if TYPE_CHECKING:
    from lmforge.train.step import TrainStep

Rows = tuple[Tensor, Tensor, Tensor]  # (inputs, targets, doc_ids), each (B, T)


class SupervisedFineTuning(LoaderObjective):
    pipeline_loss: Callable[[Tensor, Tensor], Tensor] | None = None
    by_targets = True  # how many targets a row has varies (prompts, masks)

    def __init__(self, loader: SFTLoader, val_data: list[tuple[Tensor, ...]], fused_loss: bool, packing: bool,
                 tokenizer: Tokenizer | None = None, sample_tokens: int = 0):  # fmt: skip
        self.loader, self.val_data = loader, val_data
        self.fused_loss, self.packing = fused_loss, packing
        self.tokenizer, self.sample_tokens = tokenizer, sample_tokens

    def loss(self, model: nn.Module, batch: Rows) -> Tensor:
        inputs, targets, doc_ids = batch
        docs = doc_ids if self.packing else None  # one example per row: plain causal attention
        if self.fused_loss:
            return model(inputs, targets=targets, doc_ids=docs)
        return cross_entropy(model(inputs, doc_ids=docs), targets)

    @torch.no_grad()
    def evaluate(self, step: TrainStep) -> dict:
        assert step.model is not None
        model = step.model
        was_training = model.training
        model.eval()
        total = torch.zeros((), dtype=torch.float64, device=step.device)
        counted = 0
        for batch in self.val_data:
            inputs, targets, doc_ids = (t.to(step.device) for t in batch)
            n = int((targets != IGNORE_INDEX).sum())
            if n:
                with autocast(step.device, step.dtype):
                    total += self.loss(model, (inputs, targets, doc_ids)).double() * n
                counted += n
        model.train(was_training)
        val_loss = total.item() / max(counted, 1)
        return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 700.0))}

    def samples(self, step: TrainStep, at_step: int) -> list[str]:
        """The model's greedy answer to the first validation example's prompt."""
        if self.sample_tokens <= 0 or self.tokenizer is None or not step.generates or not self.val_data:
            return []
        assert step.model is not None
        inputs, targets, doc_ids = (t[0] for t in self.val_data[0][:3])
        first = doc_ids == doc_ids[0]
        trained = (targets != IGNORE_INDEX) & first
        if not trained.any():
            return []
        prompt = inputs[: int(trained.nonzero()[0]) + 1].tolist()  # up to the assistant's first target
        end = self.tokenizer.token_to_id(CHAT_TOKENS[1])
        with torch.compiler.set_stance("force_eager"):
            ids = list(
                generate(
                    step.model, prompt, self.sample_tokens, temperature=0.0, eos_id=end, dtype=step.dtype
                )
            )
        answer = self.tokenizer.decode([i for i in ids if i != end])
        return [f"sample: {self.tokenizer.decode(prompt)[-60:]!r} -> {answer!r}"]

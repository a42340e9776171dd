"""Objectives: what differs between kinds of training, behind one small interface.

The training loop (lmforge.train.loop) owns everything that is the same for every kind of
training: the step (forward, backward over micro-batches, clipping, optimizer), the schedule,
evaluation and checkpoint timing, the non-finite guards, metrics and the stop signal. An
objective supplies the rest:

    next_batch()            this rank's next micro-batch, (inputs, targets) on the host
    loss(model, batch)      the micro-batch's mean loss; called under autocast by the step
    pipeline_loss           loss_fn(last stage output, targets) for pipeline schedules, or None
                            when the objective cannot run under parallel.pp > 1
    evaluate(step)          validation metrics, {"val_loss", "val_ppl", ...}, the same on every rank
    samples(step, at_step)  lines to show after an evaluation (generated text; [] for none)
    by_targets              True when micro-batches hold different numbers of targets (the step
                            then weighs each by its share of the step's targets on all ranks)
    state_dict()            what it saves in a checkpoint (JSON: its data position) ...
    load_state_dict(state)  ... and restores on resume
    close()

Causal-LM pretraining is the first objective. Masked LM (targets -100 outside the masked
positions), SFT (targets -100 on the prompt), classification (a head's logits against labels)
and distillation (a teacher held by the objective, so never saved with the model) change only
these methods; the loop does not change.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import torch
from tokenizers import Tokenizer
from torch import Tensor, nn

from lmforge.data.loader import BatchLoader
from lmforge.evaluate.perplexity import evaluate_loss
from lmforge.infer.generate import complete
from lmforge.ops.cross_entropy import cross_entropy

if TYPE_CHECKING:
    from lmforge.train.step import TrainStep

Batch = tuple[Tensor, Tensor]  # (inputs, targets), each (B, T) for the language-model objectives
# What the step feeds a loss: (inputs, targets) and whatever else an objective adds after them
# (SFT's packed rows: doc_ids), which only its own loss reads.
AnyBatch = tuple[Tensor, ...]
LossFn = Callable[[nn.Module, Any], Tensor]


class Objective(Protocol):
    # Whether micro-batches hold different numbers of targets (TrainStep.forward_backward's by_targets)
    by_targets: bool

    @property
    def pipeline_loss(self) -> Callable[[Tensor, Tensor], Tensor] | None: ...

    def next_batch(self) -> AnyBatch: ...

    def loss(self, model: nn.Module, batch: Any) -> Tensor: ...

    def evaluate(self, step: TrainStep) -> dict: ...

    def samples(self, step: TrainStep, at_step: int) -> list[str]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...

    def close(self) -> None: ...


def next_token_loss(fused: bool) -> LossFn:
    """Mean next-token cross-entropy of a micro-batch. fused: the model computes it from its last
    hidden state chunk by chunk and never materialises the (B, T, V) logits."""

    def loss(model: nn.Module, batch: Batch) -> Tensor:
        inputs, targets = batch
        if fused:
            return model(inputs, targets=targets)
        return cross_entropy(model(inputs), targets)

    return loss


class LoaderObjective:
    """What the objectives that read one data loader share: its batches, its position in a
    checkpoint (JSON: `{"loader": ...}`), and closing it (its worker processes)."""

    loader: Any  # next_batch(), state_dict(), load_state_dict(state), close()

    def next_batch(self) -> AnyBatch:
        return self.loader.next_batch()

    def state_dict(self) -> dict:
        return {"loader": self.loader.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state["loader"])

    def close(self) -> None:
        self.loader.close()


class CausalLM(LoaderObjective):
    """Next-token prediction on a prepared corpus: pretraining's objective."""

    pipeline_loss: Callable[[Tensor, Tensor], Tensor] | None = staticmethod(cross_entropy)
    by_targets = False  # every window has seq_len targets

    def __init_subclass__(cls, **kwargs: object) -> None:
        # A subclass that changes the loss but not the pipeline's would train next-token
        # cross-entropy under parallel.pp > 1 without a word: it must say what the pipeline computes.
        super().__init_subclass__(**kwargs)
        if "loss" in cls.__dict__ and "pipeline_loss" not in cls.__dict__:
            cls.pipeline_loss = None

    def __init__(
        self,
        loader: BatchLoader,
        val_data: list[Batch],
        fused_loss: bool,
        tokenizer: Tokenizer | None = None,
        sample_tokens: int = 0,
    ):
        """val_data: the validation batches, the same on every rank (under pp each is split into
        the schedule's micro-batches). tokenizer and sample_tokens: print a sample at each evaluation."""
        self.loader = loader
        self.val_data = val_data
        self.fused_loss = fused_loss
        self._loss = next_token_loss(fused_loss)
        self.tokenizer = tokenizer
        self.sample_tokens = sample_tokens

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        return self._loss(model, batch)

    def evaluate(self, step: TrainStep) -> dict:
        # Every rank evaluates the same batches (FSDP needs all ranks in each forward).
        if step.pipe is not None:
            val_loss = step.pipe.evaluate(self.val_data, step.device)
            return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 700.0))}
        assert step.model is not None
        record = evaluate_loss(step.model, self.val_data, step.device, step.dtype)
        record.pop("val_tokens")
        return record

    def samples(self, step: TrainStep, at_step: int) -> list[str]:
        if self.sample_tokens <= 0 or self.tokenizer is None or not step.generates:
            return []
        assert step.model is not None
        # Eagerly: generation's changing shapes and KV caches would make compiled blocks recompile
        # until Dynamo gives up on them, for training too.
        with torch.compiler.set_stance("force_eager"):
            text = complete(step.model, self.tokenizer, "def ", self.sample_tokens, temperature=0.8, top_k=50,
                            seed=at_step, dtype=step.dtype)  # fmt: skip
        return [f"sample: def {text!r}"]

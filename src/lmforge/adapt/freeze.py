"""Freezing: parameters that training leaves unchanged (the `freeze` config section).

A frozen parameter has requires_grad=False before the optimizer is built, so it gets no gradient
(autograd skips it), no optimizer state (lmforge.train.optim leaves it out of the param groups) and
no update, and data-parallel wrappers neither reduce nor shard a gradient for it. It is still saved
in every checkpoint, so a fine-tuned run is a complete model.
"""

from __future__ import annotations

from typing import cast

from torch import nn

from lmforge.config import FreezeConfig
from lmforge.errors import ConfigError
from lmforge.models import FamilyModel, blocks, spec_of


def apply_freeze(model: nn.Module, cfg: FreezeConfig) -> None:
    """Set requires_grad=False on what `cfg` names, in `model` (a whole model or a pipeline stage,
    whose blocks keep their global indices: freeze.first_blocks counts layers of the whole model)."""
    n_layers = cast(FamilyModel, model).cfg.n_layers  # a stage keeps the whole model's config
    if cfg.first_blocks > n_layers:
        raise ConfigError(
            f"config key 'freeze.first_blocks' is {cfg.first_blocks} but the model has {n_layers} blocks"
        )
    stages = spec_of(model).stages
    classifier = getattr(model, "classifier", None)
    if (
        classifier is not None
        and not stages.ties_embeddings(model.cfg)
        and getattr(model, stages.head) is not None
    ):
        # A classifier's loss never reads the language-model head: it gets no gradient (and DDP
        # must not wait for one). A tied head is the embedding, which the classifier does read.
        getattr(model, stages.head).requires_grad_(False)
    if cfg.all_but_head:
        model.requires_grad_(False)
        head = classifier if classifier is not None else getattr(model, stages.head)
        if head is not None:  # a pipeline stage without the head trains nothing
            head.requires_grad_(True)
        return
    if cfg.embeddings:
        for name in stages.first:  # the token embeddings (and learned positions)
            module = getattr(model, name)
            if module is not None:
                module.requires_grad_(False)
    for index, block in blocks(model).items():
        if int(index) < cfg.first_blocks:
            block.requires_grad_(False)


def trainable_counts(parts: nn.Module | list[nn.Module]) -> tuple[int, int]:
    """(trainable parameters, all parameters) of a model or this rank's pipeline stages, a tied
    weight counted once (DTensors by their whole size)."""
    params = [p for part in (parts if isinstance(parts, list) else [parts]) for p in part.parameters()]
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def state_bytes(parts: nn.Module | list[nn.Module], adam_moments: int = 2) -> dict[str, int]:
    """Bytes of the parameters (all), their gradients and the optimizer's state (trainable ones
    only: Adam/AdamW keep `adam_moments` tensors of a parameter's size and dtype), a tied weight
    once. Exact arithmetic from the parameters' sizes, so it works on the meta device too; Adam's
    0-d step counters (8 bytes each) are left out."""
    params = {id(p): p for part in (parts if isinstance(parts, list) else [parts]) for p in part.parameters()}
    trainable = [p for p in params.values() if p.requires_grad]
    grads = sum(p.numel() * p.element_size() for p in trainable)
    return {
        "params": sum(p.numel() * p.element_size() for p in params.values()),
        "grads": grads,
        "optimizer": adam_moments * grads,
    }

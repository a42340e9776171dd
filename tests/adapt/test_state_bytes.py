"""The trainable-state arithmetic (lmforge.adapt.freeze.state_bytes) against the real tensors of a
training step: parameters, their gradients, AdamW's state, for full, frozen and LoRA fine-tuning."""

from __future__ import annotations

import pytest
import torch

from lmforge.adapt.freeze import apply_freeze, state_bytes
from lmforge.adapt.lora import apply_lora
from lmforge.config import FreezeConfig, LoraConfig, OptimConfig
from lmforge.models import build_model, model_config
from lmforge.train.optim import build_optimizer


@pytest.mark.parametrize("kind", ["full", "freeze", "lora"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_state_bytes_are_the_tensors_bytes(kind, family):
    torch.manual_seed(0)
    model = build_model(model_config(family, "debug"), "cpu")
    if kind == "freeze":
        apply_freeze(model, FreezeConfig(embeddings=True, first_blocks=1))
    if kind == "lora":
        apply_lora(model, LoraConfig(rank=4, targets=["attention", "mlp"]))
    predicted = state_bytes(model)  # before any tensor but the parameters exists
    optimizer = build_optimizer(model, OptimConfig(name="adamw"), "cpu")
    ids = torch.randint(0, 512, (2, 17))
    model(ids[:, :-1], targets=ids[:, 1:]).backward()
    optimizer.step()

    params = {id(p): p for p in model.parameters()}.values()  # a tied weight once
    grads = sum(p.grad.nbytes for p in params if p.grad is not None)
    moments = sum(t.nbytes for state in optimizer.state.values() for t in state.values() if t.ndim > 0)
    assert predicted == {"params": sum(p.nbytes for p in params), "grads": grads, "optimizer": moments}
    if kind != "full":
        assert grads < 0.8 * predicted["params"]

"""What the generation tests share: debug models whose greedy choices depend on position and context."""

from __future__ import annotations

import pytest
import torch

from lmforge.models import build_model, model_config


def make_sharp_model(family: str, seed: int = 1, **overrides):
    """A debug model whose every weight matrix is re-drawn large (std 0.5). A freshly initialised
    model tends to pick one token everywhere, so a row decoded at the wrong position, or attending
    to another row's cache, would go unnoticed; here each argmax depends on what the row attends to."""
    torch.manual_seed(0)
    model = build_model(model_config(family, "debug", **overrides))
    weights = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim >= 2:
                param.copy_(torch.randn(param.shape, generator=weights) * 0.5)
    return model.eval()


@pytest.fixture
def sharp_model():
    return make_sharp_model


def make_random_prompts(lengths: list[int], vocab: int = 512, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=generator).tolist() for n in lengths]


@pytest.fixture
def random_prompts():
    """random_prompts([3, 17, ...]): token-id prompts of those lengths (seeded)."""
    return make_random_prompts

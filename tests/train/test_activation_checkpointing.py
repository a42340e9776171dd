"""Activation checkpointing changes memory and compute, never the numbers."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge.models import blocks, build_model, model_config
from lmforge.train.activation_checkpointing import apply_activation_checkpointing
from lmforge.train.pretrain import pretrain


def gradients(family: str, mode: str) -> tuple[int, list[torch.Tensor], torch.Tensor]:
    torch.manual_seed(0)
    model = build_model(model_config(family, "debug", n_layers=4))
    count = apply_activation_checkpointing(model, mode)
    calls = []
    for block in blocks(model).values():
        next(block.children()).register_forward_hook(lambda *_: calls.append(1))  # its first sub-layer
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 33))
    model(tokens[:, :-1], targets=tokens[:, 1:]).backward()
    assert len(calls) == 4 + count  # a checkpointed block runs again in backward
    with torch.no_grad():  # evaluation goes through the same blocks without recomputation
        logits = model(tokens[:, :-1])
    return count, [p.grad for p in model.parameters()], logits


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize(("mode", "blocks"), [("full", 4), ("selective", 2)])
def test_checkpointed_blocks_give_the_same_gradients(family, mode, blocks):
    _, want, want_logits = gradients(family, "none")
    count, got, logits = gradients(family, mode)
    assert count == blocks
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    assert torch.equal(logits, want_logits)


def test_training_with_full_checkpointing_gives_the_same_losses(debug_config, tmp_path):
    def losses(mode: str) -> list[float]:
        out = tmp_path / mode
        pretrain(debug_config(train={"max_steps": 4, "eval_every": 0, "activation_checkpointing": mode}), out)
        return [
            r["loss"]
            for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if "loss" in r
        ]

    assert losses("full") == losses("none")

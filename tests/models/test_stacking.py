"""Stacked projection weights for decoding (lmforge.models.stacking): the same model, fewer matmuls,
and nothing left behind."""

from __future__ import annotations

import torch

from lmforge.adapt.lora import apply_lora
from lmforge.config import LoraConfig
from lmforge.models import build_model, model_config, spec_of
from lmforge.models.llama.fused import StackedGateUpFeedForward, StackedQKVAttention
from lmforge.models.llama.model import Attention, FeedForward
from lmforge.models.stacking import stacked_weights


def llama():
    torch.manual_seed(0)
    return build_model(model_config("llama", "debug")).eval()


def storage(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


def test_stacked_weights_are_views_of_one_matrix_with_the_same_logits_and_are_given_back():
    model = llama()
    idx = torch.randint(0, model.cfg.vocab_size, (2, 9))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    with torch.no_grad():
        expected = model(idx)
    n_layers = model.cfg.n_layers
    with stacked_weights(model, spec_of(model).stacked_modules) as count, torch.no_grad():
        assert count == 2 * n_layers
        block = model.layers["0"]
        assert type(block.attention) is StackedQKVAttention
        assert type(block.feed_forward) is StackedGateUpFeedForward
        for path, names in (("attention", ("wq", "wk", "wv")), ("feed_forward", ("w1", "w3"))):
            module = getattr(block, path)
            weights = [getattr(module, name).weight for name in names]
            assert all(storage(w) == storage(module.stacked) for w in weights)  # no second copy
            rows = [before[f"layers.0.{path}.{name}.weight"] for name in names]
            assert torch.equal(module.stacked, torch.cat(rows))
        assert set(model.state_dict()) == set(before)  # the stacked matrix is not a parameter
        torch.testing.assert_close(model(idx), expected, rtol=1e-5, atol=1e-6)
    block = model.layers["0"]
    assert type(block.attention) is Attention and not hasattr(block.attention, "stacked")
    assert type(block.feed_forward) is FeedForward and not hasattr(block.feed_forward, "stacked")
    storages = [storage(p) for p in model.parameters()]
    assert len(set(storages)) == len(storages)  # every parameter has its own storage again
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name
    with torch.no_grad():
        assert torch.equal(model(idx), expected)


def test_layers_that_are_not_plain_linears_are_left_as_they_are():
    model = llama()
    apply_lora(model, LoraConfig(rank=2, targets=["attention"]))
    with stacked_weights(model, spec_of(model).stacked_modules) as count:
        assert count == model.cfg.n_layers  # the feed-forwards only
        assert type(model.layers["0"].attention) is Attention
        assert type(model.layers["0"].feed_forward) is StackedGateUpFeedForward

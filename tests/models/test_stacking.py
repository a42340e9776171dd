"""Stacked projection weights for decoding (lmforge.models.stacking): the same model, fewer matmuls,
and nothing left behind."""

from __future__ import annotations

import pytest
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


def test_a_compiled_decode_batch_stacks_and_gives_back_even_after_an_error():
    """DecodeBatch stacks for compiled decoding of a model that was not training, and unstacks on
    exit, an exception included; eager decoding and a training model's samples are left alone."""
    from lmforge.infer.generate import DecodeBatch

    model = llama()
    attention = model.layers["0"].attention
    with DecodeBatch(model, 1, 16, compile=True):
        assert type(attention) is StackedQKVAttention
    assert type(attention) is Attention
    with pytest.raises(RuntimeError, match="inside"), DecodeBatch(model, 1, 16, compile=True):
        raise RuntimeError("inside")
    assert type(attention) is Attention and not hasattr(attention, "stacked")
    with DecodeBatch(model, 1, 16):
        assert type(attention) is Attention  # eager: the copies would not pay
    model.train()
    with DecodeBatch(model, 1, 16, compile=True):
        assert type(attention) is Attention  # a training model's samples
    assert model.training


def test_stacking_under_inference_mode_leaves_trainable_parameters():
    model = llama().train()
    with torch.inference_mode(), stacked_weights(model, spec_of(model).stacked_modules) as count:
        assert count == 2 * model.cfg.n_layers
        model.eval()(torch.zeros(1, 4, dtype=torch.long))
    model(torch.zeros(1, 4, dtype=torch.long)).sum().backward()  # inference tensors would refuse
    assert model.layers["0"].attention.wq.weight.grad is not None
    assert not any(p.is_inference() for p in model.parameters())


def test_a_sharded_model_is_left_whole():
    """A DTensor weight anywhere (FSDP2 keeps its last block gathered as plain tensors between
    forwards, and fills them in place) leaves every module unstacked."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = llama()
        mesh = init_device_mesh("cpu", (1,))
        output = model.output
        output.weight = torch.nn.Parameter(DTensor.from_local(output.weight.detach(), mesh, [Replicate()]))
        with stacked_weights(model, spec_of(model).stacked_modules) as count:
            assert count == 0
            assert type(model.layers["0"].attention) is Attention
    finally:
        dist.destroy_process_group()

"""Generation keeps every tensor on the model's device. The meta device stands in for a GPU: a tensor
made on the default device (the CPU) instead of the model's shows up as a CPU tensor or as an error
where it meets a meta one. (On a GPU, tests/infer/test_sampling.py::test_generation_on_cuda_matches_the_cpu
runs the real thing.)"""

from __future__ import annotations

import pytest
import torch

from lmforge.infer.generate import decode_one_token, prefill
from lmforge.models import build_model, model_config
from lmforge.models.kv_cache import KVCache


def test_a_kv_cache_lives_on_its_device():
    cache = KVCache(2, 2, 16, 8, dtype=torch.bfloat16, device="meta")
    assert cache.k_cache.device.type == cache.v_cache.device.type == "meta"
    assert cache.k_cache.dtype == cache.v_cache.dtype == torch.bfloat16
    mask = cache.causal_mask(torch.arange(3, device="meta"))
    assert mask.device.type == "meta" and mask.shape[-1] == 16


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_prefill_and_decode_stay_on_the_models_device(family):
    model = build_model(model_config(family, "debug"), "meta").eval()
    model.setup_kv_cache(batch_size=2, max_seq_len=32)
    with torch.no_grad():
        logits = prefill(model, torch.zeros(2, 5, dtype=torch.long, device="meta"))
        assert logits.device.type == "meta" and logits.shape == (2, model.cfg.vocab_size)
        step = decode_one_token(model, torch.zeros(2, 1, dtype=torch.long, device="meta"), pos=5)
        assert step.device.type == "meta" and step.shape == (2, model.cfg.vocab_size)

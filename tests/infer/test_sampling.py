"""Sampling properties: greedy is argmax, top-k and top-p stay inside (and cover) their sets, seeds
reproduce. Every draw is counted on a seeded generator, so each test is deterministic."""

from __future__ import annotations

import pytest
import torch

from lmforge.infer.generate import generate, sample
from lmforge.models import build_model, model_config

DRAWS_PER_ROW = 500  # x 4 rows = 2,000 draws per test


@pytest.fixture(scope="module")
def debug_llama():
    torch.manual_seed(0)
    return build_model(model_config("llama", "debug"))


def random_logits(rows: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed))  # (B, V)


def draws(logits: torch.Tensor, **sampling) -> torch.Tensor:
    """DRAWS_PER_ROW samples from every row of logits (B, V) → (B, DRAWS_PER_ROW) token ids."""
    repeated = logits.repeat_interleave(DRAWS_PER_ROW, dim=0)  # (B * DRAWS_PER_ROW, V)
    ids = sample(repeated, generator=torch.Generator().manual_seed(1), **sampling)  # (B * DRAWS_PER_ROW, 1)
    return ids.view(logits.size(0), DRAWS_PER_ROW)


def nucleus(logits_row: torch.Tensor, top_p: float) -> set[int]:
    """The smallest set of most likely tokens whose probability reaches top_p (the first always in)."""
    probs = torch.softmax(logits_row.double(), dim=-1)
    kept, mass = set(), 0.0
    for token in torch.argsort(probs, descending=True).tolist():
        kept.add(token)
        mass += probs[token].item()
        if mass >= top_p:
            return kept
    return kept


def test_temperature_zero_is_argmax():
    logits = random_logits(64, 100, seed=0)
    assert torch.equal(sample(logits, temperature=0.0), logits.argmax(dim=-1, keepdim=True))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_greedy_generate_equals_argmax_over_the_full_forward(family):
    # A freshly initialised debug model tends to pick one token everywhere, whatever the position, so
    # a decode step at the wrong cache position would go unnoticed: re-draw every weight matrix large
    # enough that each token's argmax depends on its position and on what it attends to. (Norm weights
    # and biases keep their init: gpt2's random ln_f bias alone would pick the same few tokens.)
    torch.manual_seed(0)
    model = build_model(model_config(family, "debug"))
    weights = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim >= 2:
                param.copy_(torch.randn(param.shape, generator=weights) * 0.5)
    prompt = torch.randint(0, model.cfg.vocab_size, (5,), generator=torch.Generator().manual_seed(0))
    generated = list(generate(model, prompt.tolist(), 24, temperature=0.0))

    # The reference: no KV cache, the whole sequence through the model for every token.
    ids = prompt.tolist()
    model.eval()
    with torch.no_grad():
        for _ in range(24):
            logits = model(torch.tensor([ids]))  # (1, T, V)
            ids.append(int(logits[0, -1].argmax()))
    assert len(set(ids[len(prompt) :])) >= 8  # the argmax changes along the sequence: not vacuous
    assert generated == ids[len(prompt) :]


def test_top_k_samples_exactly_the_k_best():
    logits = random_logits(4, 50, seed=2)
    k = 5
    drawn = draws(logits, top_k=k)
    for row, row_draws in zip(logits, drawn, strict=True):
        top_k = set(torch.topk(row, k).indices.tolist())
        assert set(row_draws.tolist()) <= top_k  # never outside the k best...
        assert set(row_draws.tolist()) == top_k  # ...and the k-th best is not cut off either


def test_top_k_one_is_greedy():
    logits = random_logits(64, 100, seed=3)
    ids = sample(logits, temperature=1.0, top_k=1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(ids, logits.argmax(dim=-1, keepdim=True))


@pytest.mark.parametrize("top_p", [0.5, 0.8])
def test_top_p_samples_exactly_the_nucleus(top_p):
    logits = random_logits(4, 20, seed=4)
    drawn = draws(logits, top_p=top_p)
    for row, row_draws in zip(logits, drawn, strict=True):
        kept = nucleus(row, top_p)
        assert len(kept) > 1  # else this test could not tell top-p from greedy
        assert set(row_draws.tolist()) <= kept  # never outside the nucleus...
        assert set(row_draws.tolist()) == kept  # ...and not only its argmax, nor one token short


def test_top_p_one_keeps_every_token():
    logits = random_logits(8, 20, seed=5)
    unfiltered = sample(logits, top_p=None, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample(logits, top_p=1.0, generator=torch.Generator().manual_seed(0)), unfiltered)


def test_same_seed_same_tokens_other_seed_other_tokens(debug_llama):
    def tokens(seed: int) -> list[int]:
        return list(generate(debug_llama, [1, 2, 3], 32, temperature=1.0, seed=seed))

    first = tokens(seed=7)
    assert len(first) == 32
    assert tokens(seed=7) == first
    # 32 draws over a near-uniform 512-token distribution: a full collision is negligible.
    assert tokens(seed=8) != first


def test_unseeded_generate_leaves_the_global_rng_alone(debug_llama):
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    list(generate(debug_llama, [1, 2, 3], 4, temperature=1.0))
    assert torch.equal(torch.rand(4), expected)

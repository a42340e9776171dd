"""Sampling properties: greedy is argmax, top-k and top-p stay inside (and cover) their sets, seeds
reproduce. Every draw is counted on a seeded generator, so each test is deterministic."""

from __future__ import annotations

import pytest
import torch

from lmforge.errors import ConfigError
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


def sharp_model(family: str):
    """A debug model whose every weight matrix is re-drawn large. A freshly initialised one tends to
    pick one token everywhere, whatever the position, so a decode step at the wrong cache position
    would go unnoticed; here each token's argmax depends on its position and on what it attends to.
    (Norm weights and biases keep their init: gpt2's random ln_f bias alone would pick the same few
    tokens.)"""
    torch.manual_seed(0)
    model = build_model(model_config(family, "debug"))
    weights = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim >= 2:
                param.copy_(torch.randn(param.shape, generator=weights) * 0.5)
    return model


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_greedy_generate_equals_argmax_over_the_full_forward(family):
    model = sharp_model(family)
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


def reference_draw(
    logits: torch.Tensor, keep: torch.Tensor | None, temperature: float, seed: int
) -> torch.Tensor:
    """What sample() must draw: the same multinomial, on the same generator, over softmax(logits / T)
    restricted to `keep` (B, V) bool (None: every token)."""
    scaled = logits.float() / temperature
    if keep is not None:
        scaled = scaled.masked_fill(~keep, float("-inf"))
    return torch.multinomial(torch.softmax(scaled, dim=-1), 1, generator=torch.Generator().manual_seed(seed))


def drawn(logits: torch.Tensor, seed: int, **sampling) -> torch.Tensor:
    return sample(logits, generator=torch.Generator().manual_seed(seed), **sampling)


@pytest.mark.parametrize("temperature", [0.3, 1.0, 2.5])
def test_draws_are_exactly_those_of_the_scaled_distribution(temperature):
    """Token for token against an independent multinomial: the temperature divides the logits (a
    property test on the support cannot see a temperature that multiplies them)."""
    logits = random_logits(512, 12, seed=6) * 3
    got = drawn(logits, 0, temperature=temperature)
    assert torch.equal(got, reference_draw(logits, None, temperature, 0))
    assert not torch.equal(got, reference_draw(logits, None, 1 / temperature, 0)) or temperature == 1.0


@pytest.mark.parametrize(("top_k", "top_p"), [(5, None), (None, 0.7), (6, 0.6), (30, None)])
def test_filtered_draws_are_exactly_those_of_the_kept_tokens(top_k, top_p):
    logits = random_logits(256, 20, seed=7) * 2
    keep = torch.ones_like(logits, dtype=torch.bool)
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, 20), dim=1).values[:, -1:]
        keep &= logits >= kth
    if top_p is not None:
        for row in range(logits.size(0)):
            filtered = (logits[row] / 0.8).masked_fill(~keep[row], float("-inf"))  # top-p after temperature
            nucleus_row = torch.zeros(20, dtype=torch.bool)
            nucleus_row[list(nucleus(filtered, top_p))] = True
            keep[row] &= nucleus_row
    got = drawn(logits, 3, temperature=0.8, top_k=top_k, top_p=top_p)
    assert torch.equal(got, reference_draw(logits, keep, 0.8, 3))


def test_top_k_zero_and_top_p_zero_filter_nothing():
    """sample() treats top_k = 0 and top_p = 0 as off (the CLI refuses them before they get here)."""
    logits = random_logits(64, 30, seed=8)
    unfiltered = drawn(logits, 5)
    assert torch.equal(drawn(logits, 5, top_k=0), unfiltered)
    assert torch.equal(drawn(logits, 5, top_p=0.0), unfiltered)


def test_top_p_one_filters_nothing_even_when_the_running_sum_reaches_one_early(monkeypatch):
    """In fp32 the cumulative probability reaches 1.0 before a long, tiny tail: top_p = 1 must
    still leave every token drawable."""
    seen = []
    multinomial = torch.multinomial

    def spy(probs, *args, **kwargs):
        seen.append(probs.clone())
        return multinomial(probs, *args, **kwargs)

    monkeypatch.setattr(torch, "multinomial", spy)
    logits = torch.cat([torch.zeros(1, 1), torch.full((1, 50), -20.0)], dim=1)
    sample(logits, top_p=1.0, generator=torch.Generator().manual_seed(0))
    assert (seen[0] > 0).all()


def test_a_token_whose_predecessors_exactly_reach_top_p_is_dropped():
    """The boundary: the tokens before it cover exactly top_p, so the nucleus is already complete."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]])
    probs = torch.softmax(logits, dim=-1)
    top_p = float(probs[0, :2].sum())  # the mass of the two best tokens, as sample() computes it
    cumulative = probs.cumsum(dim=-1)
    assert float(cumulative[0, 2] - probs[0, 2]) == top_p  # the third token sits exactly on the boundary
    draws_ = sample(logits.repeat(400, 1), top_p=top_p, generator=torch.Generator().manual_seed(0))
    assert set(draws_.flatten().tolist()) == {0, 1}


def test_generate_samples_at_temperature_one_by_default_and_checks_its_arguments():
    model = sharp_model("llama")  # a fresh debug model is near uniform: every temperature draws alike

    def tokens(**sampling) -> list[int]:
        return list(generate(model, [1, 2, 3], 24, seed=4, **sampling))

    default = tokens()
    assert default == tokens(temperature=1.0)
    assert default != tokens(temperature=2.0) and default != tokens(temperature=0.5)
    filtered = tokens(top_k=5, top_p=0.5)
    assert filtered == tokens(temperature=1.0, top_k=5, top_p=0.5)
    assert filtered != default and filtered != tokens(top_k=5) and filtered != tokens(top_p=0.5)
    with pytest.raises(ConfigError, match="--top-k"):
        generate(model, [1], 4, top_k=0)
    with pytest.raises(ConfigError, match="--top-p"):
        generate(model, [1], 4, top_p=1.5)


def test_complete_returns_the_continuation_without_the_prompt_and_stops_at_eos():
    """complete(): the decoded new tokens only; at the end-of-text token it stops and drops it."""
    import inspect

    from lmforge.data.tokenizer import train_tokenizer
    from lmforge.infer.generate import complete

    tokenizer = train_tokenizer([inspect.getsource(torch.nn.Module)], vocab_size=512)
    model = sharp_model("llama")
    eos = tokenizer.token_to_id("<|eos|>")
    prompt_ids = tokenizer.encode("def ").ids
    ids = list(generate(model, prompt_ids, 12, temperature=0.0, eos_id=eos))
    assert complete(model, tokenizer, "def ", 12, temperature=0.0) == tokenizer.decode(
        ids[:-1] if ids[-1] == eos else ids
    )
    # Make the end-of-text token the greedy choice at the third forward only (the prefill, two
    # decode steps): complete() returns the two tokens before it, and nothing after it.
    calls = []

    def eos_at_third_call(module, inputs, logits):
        calls.append(1)
        if len(calls) == 3:
            logits = logits.clone()
            logits[..., eos] += 1e4
        return logits

    model.output.register_forward_hook(eos_at_third_call)
    ids = list(generate(model, prompt_ids, 12, temperature=0.0, eos_id=eos))
    assert len(ids) == 3 and ids[-1] == eos and eos not in ids[:-1]
    calls.clear()
    text = complete(model, tokenizer, "def ", 12, temperature=0.0)
    assert text == tokenizer.decode(ids[:2]) and text
    calls.clear()
    one = list(generate(model, prompt_ids, 1, temperature=0.0, eos_id=eos))
    calls.clear()
    assert complete(model, tokenizer, "def ", 1, temperature=0.0) == tokenizer.decode(one)  # a one-token text


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_generation_on_cuda_matches_the_cpu():
    """The KV cache, the positions and the sampler on the GPU: greedy tokens equal the CPU's."""
    model = sharp_model("llama")
    prompt = [1, 2, 3, 4, 5]
    on_cpu = list(generate(model, prompt, 24, temperature=0.0))
    on_cuda = list(generate(model.to("cuda"), prompt, 24, temperature=0.0))
    assert on_cuda == on_cpu

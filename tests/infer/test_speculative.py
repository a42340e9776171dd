"""Speculative decoding yields exactly the target's greedy tokens, whatever the draft proposes."""

from __future__ import annotations

import copy

import pytest

from lmforge.errors import ConfigError
from lmforge.infer.generate import generate
from lmforge.infer.speculative import SpeculativeStats, speculative_generate

FAMILIES = ["llama", "gpt2"]


def drafts(target, family: str, sharp_model) -> dict:
    """The target itself (every proposal accepted), its first layer alone (some accepted: both the
    rollback and the all-accepted branch run) and an unrelated model (about none accepted)."""
    truncated = copy.deepcopy(target)
    del (truncated.layers if family == "llama" else truncated.h)["1"]
    return {"self": target, "truncated": truncated, "unrelated": sharp_model(family, seed=2, n_layers=1)}


@pytest.mark.parametrize("family", FAMILIES)
def test_output_is_the_targets_greedy_output_for_any_draft(family, sharp_model):
    target = sharp_model(family)
    prompt = [5, 6, 7, 8, 9, 10, 11]
    want = list(generate(target, prompt, 40, temperature=0))
    rates = {}
    for name, draft in drafts(target, family, sharp_model).items():
        for k in (1, 4):
            stats = SpeculativeStats()
            assert list(speculative_generate(target, draft, prompt, 40, k, stats=stats)) == want, (name, k)
            assert stats.new_tokens == 40 and stats.proposed > 0
            rates[name, k] = stats.acceptance_rate
            if name == "self":
                # k + 1 tokens per verification: 1 from the prefill, then 39 in ceil(39 / (k + 1)).
                assert stats.target_forwards == -(-39 // (k + 1))
    assert rates["self", 1] == rates["self", 4] == 1.0
    assert 0 < rates["truncated", 1] < 1 and 0 < rates["truncated", 4] < 1
    assert rates["unrelated", 4] < rates["truncated", 4]


def test_eos_budget_and_context_end_as_plain_generation(sharp_model):
    target = sharp_model("llama")
    draft = drafts(target, "llama", sharp_model)["truncated"]
    prompt = [1, 2, 3]
    greedy = list(generate(target, prompt, 30, temperature=0))
    eos = greedy[9]  # ends the generation at its first occurrence, eos included
    with_eos = list(generate(target, prompt, 30, temperature=0, eos_id=eos))
    assert len(with_eos) <= 10 and with_eos[-1] == eos
    assert list(speculative_generate(target, draft, prompt, 30, 4, eos_id=eos)) == with_eos
    for max_new in (1, 2, 3):
        assert list(speculative_generate(target, draft, prompt, max_new, 4)) == greedy[:max_new]
    # A 60-token prompt in a 64-token context: 4 new tokens at most, as generate gives.
    long_prompt = list(range(60))
    near_end = list(generate(target, long_prompt, 20, temperature=0))
    assert len(near_end) == 4
    assert list(speculative_generate(target, target, long_prompt, 20, 4)) == near_end


def test_a_draft_of_another_vocabulary_or_no_draft_tokens_is_refused(sharp_model):
    target = sharp_model("llama")
    with pytest.raises(ConfigError, match="vocabulary"):
        speculative_generate(target, sharp_model("llama", vocab_size=256), [1], 4)
    with pytest.raises(ConfigError, match="--draft-tokens must be >= 1"):
        speculative_generate(target, target, [1], 4, draft_tokens=0)

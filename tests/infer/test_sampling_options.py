"""min-p, the repetition penalty and their argument checks (the filters of test_sampling.py's sample
tests, continued)."""

from __future__ import annotations

import math

import pytest
import torch

from lmforge.cli import main
from lmforge.errors import ConfigError
from lmforge.infer.generate import SamplingParams, generate, generate_batch
from lmforge.infer.sampling import penalize_repeats, sample
from lmforge.models import build_model, model_config


@pytest.mark.parametrize("min_p", [0.05, 0.3])
def test_min_p_samples_exactly_the_tokens_above_its_share_of_the_best(min_p):
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(0))
    drawn = sample(
        logits.repeat_interleave(800, dim=0), min_p=min_p, generator=torch.Generator().manual_seed(1)
    )
    drawn = drawn.view(4, 800)
    for row, row_draws in zip(logits, drawn, strict=True):
        probs = torch.softmax(row.double(), dim=-1)
        kept = set(torch.nonzero(probs >= min_p * probs.max()).flatten().tolist())
        assert 1 < len(kept) < 30  # neither greedy nor unfiltered: the test can tell
        assert set(row_draws.tolist()) == kept  # never outside, and none of them missing


def test_min_p_applies_after_temperature():
    """At temperature 2 the distribution is flatter: more tokens reach min_p of the best."""
    logits = torch.randn(1, 30, generator=torch.Generator().manual_seed(2)) * 2
    support = {}
    for temperature in (0.5, 2.0):
        draws = sample(
            logits.repeat(2000, 1), temperature, min_p=0.2, generator=torch.Generator().manual_seed(3)
        )
        scaled = torch.softmax(logits[0].double() / temperature, dim=-1)
        support[temperature] = set(draws.flatten().tolist())
        assert support[temperature] == set(torch.nonzero(scaled >= 0.2 * scaled.max()).flatten().tolist())
    assert support[0.5] < support[2.0]


def test_the_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_seen_tokens():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5, -1.0]])
    seen = torch.tensor([[True, True, False, False, False]])
    assert torch.equal(penalize_repeats(logits, seen, 2.0), torch.tensor([[1.0, -4.0, 1.0, 0.5, -1.0]]))
    assert penalize_repeats(logits, seen, 1.0) is logits


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_greedy_generation_with_a_repetition_penalty_equals_a_reference_loop(family):
    """The reference recomputes the whole sequence and penalises every token of the prompt and the
    output so far (as Hugging Face's RepetitionPenaltyLogitsProcessor does), then takes the argmax.
    (Freshly initialised models: they repeat tokens, so the penalty has something to change.)"""
    torch.manual_seed(0)
    model = build_model(model_config(family, "debug")).eval()
    prompt = [7, 8, 9, 7, 20]
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(20):
            logits = model(torch.tensor([ids]))[0, -1]  # (V,)
            seen = torch.zeros_like(logits, dtype=torch.bool)
            seen[ids] = True
            logits = torch.where(seen, torch.where(logits > 0, logits / 1.8, logits * 1.8), logits)
            ids.append(int(logits.argmax()))
    want = ids[len(prompt) :]
    assert want != list(generate(model, prompt, 20, temperature=0))  # the penalty changes the output
    assert list(generate(model, prompt, 20, temperature=0, repetition_penalty=1.8)) == want
    params = SamplingParams(max_new_tokens=20, temperature=0, repetition_penalty=1.8)
    assert generate_batch(model, [[1, 2], prompt], params)[1] == want


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["--min-p", "1.5"], "--min-p must be in [0, 1], got 1.5"),
        (["--repetition-penalty", "0"], "--repetition-penalty must be > 0 (1 is off), got 0.0"),
        (["--stop", ""], "--stop strings must not be empty, got ''"),
        (["--input", "prompts.jsonl"], "--input and --output go together"),
        (["--input", "in.jsonl", "--output", "out.jsonl", "--prompt", "x"], "--prompt and --input: give one"),
        (["--draft", "other", "--temperature", "0.5"], "--draft verifies the draft's tokens greedily"),
        (
            ["--draft", "other", "--temperature", "0", "--draft-tokens", "0"],
            "--draft-tokens must be >= 1, got 0",
        ),
    ],
)
def test_the_cli_refuses_bad_options_in_one_line_before_loading(tmp_path, capsys, args, error):
    # tmp_path holds no checkpoint: the options must be checked before the model is loaded.
    assert main(["generate", str(tmp_path), *args]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1, err
    assert err.startswith(f"lmforge: error: {error}"), err


def test_sampling_params_check_their_values():
    with pytest.raises(ConfigError, match="--min-p"):
        SamplingParams(min_p=math.nan)
    with pytest.raises(ConfigError, match="--repetition-penalty"):
        SamplingParams(repetition_penalty=math.inf)
    assert SamplingParams(stop=["a"]).stop == ("a",)  # type: ignore[arg-type]  # a list is taken too

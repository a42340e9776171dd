"""Out-of-range sampling arguments: one error line naming the flag and value, before any model loads."""

from __future__ import annotations

import math

import pytest
import torch

from lmforge.cli import main
from lmforge.errors import ConfigError
from lmforge.infer.generate import check_sampling_args, generate
from lmforge.models import build_model, model_config


@pytest.mark.parametrize(
    ("args", "flag", "shown"),
    [
        (["--max-new-tokens", "-5"], "--max-new-tokens", "-5"),
        (["--max-new-tokens=0"], "--max-new-tokens", "0"),
        (["--temperature", "-1"], "--temperature", "-1.0"),
        (["--top-p", "0"], "--top-p", "0.0"),
        (["--top-p", "1.5"], "--top-p", "1.5"),
        (["--top-k", "0"], "--top-k", "0"),
    ],
)
def test_cli_rejects_bad_sampling_args_in_one_line(tmp_path, capsys, args, flag, shown):
    # tmp_path holds no checkpoint: the arguments must be checked before the model is loaded.
    assert main(["generate", str(tmp_path), *args]) == 2
    out, err = capsys.readouterr()
    assert out == ""  # not even the prompt
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"lmforge: error: {flag} must be "), err
    assert err.rstrip().endswith(f"got {shown}"), err


@pytest.mark.parametrize(
    ("max_new_tokens", "temperature", "top_k", "top_p"),
    [(1, 0.0, 1, 1.0), (1, 0.8, None, None), (100, 2.0, 50, 0.9)],
)
def test_boundary_values_are_accepted(max_new_tokens, temperature, top_k, top_p):
    check_sampling_args(max_new_tokens, temperature, top_k, top_p)


def test_nan_is_rejected():
    with pytest.raises(ConfigError, match="--temperature"):
        check_sampling_args(10, math.nan, None, None)
    with pytest.raises(ConfigError, match="--top-p"):
        check_sampling_args(10, 1.0, None, math.nan)


def test_python_generate_refuses_at_the_call():
    torch.manual_seed(0)
    model = build_model(model_config("llama", "debug"))
    # No iteration: the error comes when generate is called, not at the first token.
    with pytest.raises(ConfigError, match="--max-new-tokens must be > 0, got 0"):
        generate(model, [1, 2, 3], max_new_tokens=0)

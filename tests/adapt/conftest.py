"""The run every fine-tuning test starts from."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, session_debug_config) -> Path:
    """A debug llama pretrained 6 steps on the test corpus (one per test module)."""
    from lmforge.train.pretrain import pretrain

    out = tmp_path_factory.mktemp("base") / "run"
    quiet = {"progress": False, "tensorboard": False, "plot": False}
    pretrain(
        session_debug_config(train={"max_steps": 6, "eval_every": 0, "sample_tokens": 0}, logging=quiet), out
    )
    return out

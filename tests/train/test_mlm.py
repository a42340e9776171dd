"""Masked-LM pretraining of the encoder family: the masking rule, and `lmforge pretrain` of a bert
run (loss down, masked-LM accuracy reported, exact resume, `lmforge eval` on it)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.cli import main
from lmforge.config import load_config
from lmforge.data.mlm import IGNORE_INDEX, mask_tokens
from lmforge.rundir import checkpoint_weights, latest_checkpoint
from lmforge.train.pretrain import pretrain

QUIET = {"progress": False, "tensorboard": False, "plot": False}
SPECIAL = [0, 1, 2, 512]  # bos, eos, pad, mask


def test_masking_follows_berts_rule_and_depends_on_seed_and_row_only():
    tokens = torch.randint(3, 512, (64, 256), generator=torch.Generator().manual_seed(0))
    tokens[:, ::16] = 1  # eos tokens: never chosen
    inputs, targets = mask_tokens(tokens, list(range(64)), seed=7, mask_id=512, special=SPECIAL, vocab=513)
    chosen = targets != IGNORE_INDEX
    eligible = tokens != 1
    assert not chosen[~eligible].any()
    assert abs(chosen.sum() / eligible.sum() - 0.15) < 0.01
    assert torch.equal(targets[chosen], tokens[chosen])
    masked = (inputs == 512) & chosen
    kept = (inputs == tokens) & chosen
    swapped = chosen & ~masked & ~kept
    n = chosen.sum().item()
    assert (
        abs(masked.sum() / n - 0.8) < 0.02 and abs(swapped.sum() / n - 0.1) < 0.02
    )  # kept: the rest (and rare equal draws)
    assert torch.equal(inputs[~chosen], tokens[~chosen])
    assert not np.isin(inputs[swapped].numpy(), SPECIAL).any()
    # Row r's mask is a function of (seed, r): the same rows in another batch split mask alike.
    again, _ = mask_tokens(tokens[10:12], [10, 11], seed=7, mask_id=512, special=SPECIAL, vocab=513)
    assert torch.equal(again, inputs[10:12])
    other_seed, _ = mask_tokens(tokens[10:12], [10, 11], seed=8, mask_id=512, special=SPECIAL, vocab=513)
    assert not torch.equal(other_seed, inputs[10:12])


def bert_config(debug_config, steps):
    return debug_config(model={"family": "bert", "flavor": "debug"},
                        train={"max_steps": steps, "eval_every": 10, "sample_tokens": 0, "seed": 3},
                        checkpoint={"every_steps": 10}, logging=QUIET, optim={"lr": 3e-3},
                        schedule={"total_steps": 30})  # the same schedule for the 20-step run resumed to 30  # fmt: skip


def test_masked_lm_pretraining_learns_and_resumes_exactly(debug_config, tmp_path, capsys):
    result = pretrain(bert_config(debug_config, 30), tmp_path / "straight")
    records = [
        json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()
    ]
    evals = [r for r in records if "val_accuracy" in r]
    assert [r["step"] for r in evals] == [10, 20, 30]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.2  # it learns
    assert 0 < result["val_accuracy"] < 1
    assert "val_accuracy" in capsys.readouterr().out  # printed with each evaluation

    pretrain(bert_config(debug_config, 20), tmp_path / "resumed")
    cfg = load_config(tmp_path / "resumed" / "config.yaml")
    pretrain(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_steps=30)), tmp_path / "resumed",
             resume=True)  # fmt: skip
    straight = checkpoint_weights(latest_checkpoint(tmp_path / "straight"))
    resumed = checkpoint_weights(latest_checkpoint(tmp_path / "resumed"))
    assert all(torch.equal(straight[n], resumed[n]) for n in straight)

    # `lmforge eval` of an encoder: masked-LM loss and accuracy; `generate` refuses in one line.
    assert main(["eval", str(tmp_path / "straight")]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["val_masked"] > 0 and 0 < out["val_accuracy"] < 1
    assert main(["generate", str(tmp_path / "straight"), "--prompt", "x"]) == 2
    assert "is an encoder (model family bert): it does not generate text" in capsys.readouterr().err

    # A classifier fine-tuned from it that reads the mean of the tokens: the fine-tune sets the head's
    # pooling, and keeps the rest of the model section.
    labelled = tmp_path / "labelled.jsonl"
    words = {"code": "def class import return", "prose": "the and of to in"}
    labelled.write_text("".join(json.dumps({"text": f"{t} {i}", "label": k}) + "\n" for i in range(20) for k, t in words.items()))  # fmt: skip
    recipe = Path(__file__).parents[2] / "recipes" / "classify.yaml"
    args = ["finetune", "--config", str(recipe), "--init", str(tmp_path / "straight"), "--out", str(tmp_path / "cls"),
            f"--data.source={labelled}", f"--data.seq_len={cfg.data.seq_len}", "--model.shape={pooling: mean}",
            "--train.max_steps=2", "--train.eval_every=0", "--logging.progress=false"]  # fmt: skip
    assert main(args) == 0, capsys.readouterr().err
    model = load_config(tmp_path / "cls" / "config.yaml").model
    assert (model.family, model.shape) == (
        "bert",
        {**(cfg.model.shape or {}), "n_classes": 2, "pooling": "mean"},
    )


def test_an_encoder_refuses_sft_and_model_parallel_layouts(debug_config, tmp_path):
    from lmforge.errors import ConfigError

    cfg = debug_config(model={"family": "bert", "flavor": "debug"}, data={"task": "sft"}, logging=QUIET)
    with pytest.raises(ConfigError, match="sft needs a decoder, not model.family bert"):
        pretrain(cfg, tmp_path / "run")

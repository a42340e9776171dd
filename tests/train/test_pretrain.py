"""End-to-end pretraining on the debug flavor: loss goes down, resume is exact, outputs exist."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge.errors import CheckpointError, ConfigError
from lmforge.rundir import latest_checkpoint, list_checkpoints, verify_checkpoint
from lmforge.train.checkpoint import load_trainer_state
from lmforge.train.metrics import read_metrics
from lmforge.train.pretrain import pretrain


def train_losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r}


def test_loss_decreases_and_run_directory_is_complete(debug_config, tmp_path):
    cfg = debug_config(train={"max_steps": 40, "eval_every": 20}, checkpoint={"every_steps": 20})
    result = pretrain(cfg, tmp_path / "run")
    run = tmp_path / "run"
    losses = train_losses(run)
    assert sorted(losses) == list(range(1, 41))
    first, last = sum(losses[s] for s in range(1, 6)) / 5, sum(losses[s] for s in range(36, 41)) / 5
    assert last < first - 0.5, (first, last)
    records = read_metrics(run / "metrics.jsonl")
    train_record = next(r for r in records if "loss" in r)
    assert set(train_record) == {
        "step",
        "loss",
        "lr",
        "grad_norm",
        "tokens_per_sec",
        "mfu",
        "elapsed_s",
        "nonfinite_steps",
    }
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [20, 40]
    assert result["val_loss"] == evals[-1]["val_loss"]
    assert (
        abs(evals[-1]["val_ppl"] - torch.tensor(evals[-1]["val_loss"]).exp().item())
        < 1e-3 * evals[-1]["val_ppl"]
    )
    for name in ("config.yaml", "tokenizer.json", "metrics.jsonl", "loss.png"):
        assert (run / name).is_file(), name
    assert list((run / "tb").glob("events.out.tfevents.*"))
    assert [p.name for p in list_checkpoints(run)] == ["step_0000020", "step_0000040"]
    manifest = verify_checkpoint(latest_checkpoint(run))
    assert manifest["step"] == 40
    assert any(name.endswith(".safetensors") for name in manifest["files"])


@pytest.mark.parametrize("optim", ["adamw", "sgd", "muon"])
def test_resume_is_exact(debug_config, tmp_path, optim):
    """N steps + stop + resume + N steps == 2N straight steps, loss for loss (==, not approx)."""
    sections = {
        "train": {"max_steps": 12, "eval_every": 0, "micro_batch_size": 4, "global_batch_tokens": 4 * 64 * 2},
        "optim": {"name": optim},
        "checkpoint": {"every_steps": 6},
    }
    straight = tmp_path / "straight"
    pretrain(debug_config(**sections), straight)

    stopped = tmp_path / "stopped"
    first_half = debug_config(**{**sections, "schedule": {"total_steps": 12},
                                               "train": {**sections["train"], "max_steps": 6}})  # fmt: skip
    pretrain(first_half, stopped)
    assert load_trainer_state(latest_checkpoint(stopped))["step"] == 6
    second_half = debug_config(**{**sections, "schedule": {"total_steps": 12}})
    pretrain(second_half, stopped, resume=True)

    assert train_losses(stopped) == train_losses(straight)
    assert len(train_losses(stopped)) == 12


def test_resume_errors(debug_config, tmp_path):
    cfg = debug_config(train={"max_steps": 2, "eval_every": 0})
    with pytest.raises(CheckpointError, match="does not exist"):
        pretrain(cfg, tmp_path / "nope", resume=True)
    pretrain(cfg, tmp_path / "run")
    with pytest.raises(CheckpointError, match="already has checkpoints"):
        pretrain(cfg, tmp_path / "run")
    other_model = debug_config(train={"max_steps": 4}, model={"family": "gpt2"})
    with pytest.raises(ConfigError, match="section 'model' differs"):
        pretrain(other_model, tmp_path / "run", resume=True)


def test_corrupt_latest_checkpoint_falls_back_with_warning(debug_config, tmp_path):
    cfg = debug_config(train={"max_steps": 4, "eval_every": 0}, checkpoint={"every_steps": 2})
    pretrain(cfg, tmp_path / "run")
    newest = latest_checkpoint(tmp_path / "run")
    weights = next((newest / "model").glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="sha256"):
        assert latest_checkpoint(tmp_path / "run").name == "step_0000002"


def test_tokenizer_larger_than_model_vocab_is_refused(debug_config, tmp_path):
    cfg = debug_config(model={"vocab_size": 128})
    with pytest.raises(ConfigError, match="tokenizer has 512 tokens"):
        pretrain(cfg, tmp_path / "run")


def test_metrics_are_json_lines(debug_config, tmp_path):
    cfg = debug_config(train={"max_steps": 3, "eval_every": 0}, logging={"log_every": 2})
    pretrain(cfg, tmp_path / "run")
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in lines]
    assert steps == [2, 3, 3]  # logged steps 2 and 3 (the last), then the final evaluation


def test_checkpoints_disabled_writes_none_and_cannot_be_resumed(debug_config, tmp_path):
    cfg = debug_config(
        train={"max_steps": 4, "eval_every": 0}, checkpoint={"every_steps": 2, "enabled": False}
    )
    result = pretrain(cfg, tmp_path / "run")
    assert result["step"] == 4 and (tmp_path / "run" / "metrics.jsonl").is_file()
    assert list_checkpoints(tmp_path / "run") == []
    with pytest.raises(CheckpointError, match="no checkpoint"):
        pretrain(cfg, tmp_path / "run", resume=True)

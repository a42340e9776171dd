"""Distillation: the loss's terms, the teacher left unchanged, and the run on the one loop (exact resume)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from lmforge.cli import main
from lmforge.config import load_config
from lmforge.ops.cross_entropy import cross_entropy
from lmforge.rundir import latest_checkpoint, sha256_file
from lmforge.train.distill import distillation_loss
from lmforge.train.pretrain import pretrain

QUIET = {"progress": False, "tensorboard": False, "plot": False}
RECIPE = Path(__file__).parents[2] / "recipes" / "debug.yaml"


def test_the_kl_term_is_zero_when_student_equals_teacher():
    logits = torch.randn(2, 5, 17)
    targets = torch.randint(0, 17, (2, 5))
    assert distillation_loss(logits, logits, targets, alpha=1.0, temperature=2.0).abs().item() < 1e-6
    # With alpha 0.5 only the hard half remains.
    mixed = distillation_loss(logits, logits, targets, alpha=0.5, temperature=2.0)
    assert torch.allclose(mixed, 0.5 * cross_entropy(logits, targets), atol=1e-6)


def test_the_loss_is_the_papers_formula():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 3, 11), torch.randn(2, 3, 11)
    targets = torch.randint(0, 11, (2, 3))
    alpha, t = 0.3, 2.5
    p = F.softmax(teacher / t, dim=-1)
    kl = (p * (p.log() - F.log_softmax(student / t, dim=-1))).sum(-1).mean()  # mean over the 6 tokens
    hard = F.cross_entropy(student.flatten(0, 1), targets.flatten())
    expected = (1 - alpha) * hard + alpha * t**2 * kl
    got = distillation_loss(student, teacher, targets, alpha, t)
    assert math.isclose(got.item(), expected.item(), rel_tol=1e-5)
    assert got.item() > (1 - alpha) * hard.item()  # the soft term is there: distributions differ


def _student(debug_config, teacher: Path, steps: int, **train):
    return debug_config(
        train={"max_steps": steps, "eval_every": steps, "eval_batches": 2, "sample_tokens": 0, **train},
        checkpoint={"every_steps": 2},
        logging=QUIET,
        model={"shape": {"n_layers": 1}},  # a smaller student than the debug teacher
        distill={"teacher": str(teacher), "alpha": 0.7, "temperature": 2.0},
    )


def test_a_distilled_run_leaves_the_teacher_alone_and_resumes_exactly(base_run, debug_config, tmp_path):
    teacher_files = {p: sha256_file(p) for p in sorted(latest_checkpoint(base_run).rglob("*.safetensors"))}
    straight = pretrain(_student(debug_config, base_run, 4), tmp_path / "straight")
    pretrain(_student(debug_config, base_run, 2), tmp_path / "resumed")
    cfg = load_config(tmp_path / "resumed" / "config.yaml")
    assert cfg.distill.teacher == str(latest_checkpoint(base_run).resolve())
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_steps=4))
    resumed = pretrain(cfg, tmp_path / "resumed", resume=True)
    assert resumed["val_loss"] == straight["val_loss"]
    a, b = (load_file(next((latest_checkpoint(tmp_path / r) / "model").glob("*.safetensors")))
            for r in ("straight", "resumed"))  # fmt: skip
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert {p: sha256_file(p) for p in teacher_files} == teacher_files
    # The checkpoint is the student's alone: one block, no teacher tensors.
    assert not any("layers.1." in k for k in a)


def test_the_teacher_changes_what_the_student_learns(base_run, debug_config, tmp_path):
    distilled = pretrain(_student(debug_config, base_run, 2), tmp_path / "distilled")
    cfg = _student(debug_config, base_run, 2)
    plain = pretrain(
        dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, teacher=None)), tmp_path / "plain"
    )
    assert distilled["val_loss"] != plain["val_loss"]


def test_a_student_of_another_family_trains_from_the_teacher(base_run, prepared_dir, tmp_path, capsys):
    """A gpt2 student (tied embedding, learned positions, LayerNorm) distilled from the llama teacher
    through the CLI, on the same tokenizer."""
    teacher_files = {p: sha256_file(p) for p in sorted(latest_checkpoint(base_run).rglob("*.safetensors"))}
    student = ["--config", str(RECIPE), "--model.family=gpt2", f"--data.dir={prepared_dir}",
               "--train.eval_batches=2", "--train.sample_tokens=0",
               "--logging.progress=false", "--logging.tensorboard=false", "--logging.plot=false"]  # fmt: skip
    out = tmp_path / "distilled"
    assert main(["compress", "distill", "--teacher", str(base_run), "--out", str(out), *student,
                 "--train.max_steps=3", "--train.eval_every=3"]) == 0  # fmt: skip
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    losses = _losses(out)
    assert sorted(losses) == [1, 2, 3] and all(math.isfinite(v) for v in losses.values())
    assert math.isfinite(result["val_loss"]) and latest_checkpoint(out).name == "step_0000003"
    cfg = load_config(out / "config.yaml")
    assert cfg.model.family == "gpt2" and cfg.distill.teacher == str(latest_checkpoint(base_run).resolve())
    assert load_config(Path(cfg.distill.teacher) / "config.yaml").model.family == "llama"
    weights = load_file(next((latest_checkpoint(out) / "model").glob("*.safetensors")))
    assert "wte.weight" in weights and not any(k.startswith("tok_embeddings.") for k in weights)
    assert {p: sha256_file(p) for p in teacher_files} == teacher_files
    # The teacher is in the loss: the first step's (the same weights and batch) is not the plain one's
    # (the same up to the fused cross-entropy's rounding when alpha is 0).
    assert main(["pretrain", "--out", str(tmp_path / "plain"), *student, "--train.max_steps=1",
                 "--train.eval_every=0"]) == 0  # fmt: skip
    assert not math.isclose(_losses(tmp_path / "plain")[1], losses[1], rel_tol=1e-3)


def _losses(run: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def test_the_cli_refuses_a_teacher_with_another_tokenizer(base_run, tmp_path, capsys):
    other = tmp_path / "tokenizer.json"
    other.write_text(
        (latest_checkpoint(base_run) / "tokenizer.json").read_text().replace('"<|eos|>"', '"<|end|>"', 1)
    )
    code = main(["compress", "distill", "--teacher", str(base_run), "--out", str(tmp_path / "run"),
                 "--data.tokenizer", str(other), "--train.max_steps", "1"])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("lmforge: error:") and "distill.teacher" in err and "tokenizer" in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_the_cli_needs_a_teacher(tmp_path, capsys):
    assert main(["compress", "distill", "--out", str(tmp_path / "run")]) == 2
    assert "--teacher" in capsys.readouterr().err


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, session_debug_config) -> Path:
    """A debug llama pretrained 6 steps on the test corpus: the teacher."""
    out = tmp_path_factory.mktemp("teacher") / "run"
    pretrain(
        session_debug_config(train={"max_steps": 6, "eval_every": 0, "sample_tokens": 0}, logging=QUIET), out
    )
    return out

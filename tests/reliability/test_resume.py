"""Exact resume (points 2, 3, 4): full state after a clean stop, data order with loader workers on
2 ranks across an epoch boundary, and a checkpoint carried from 4 to 2 to 1 processes."""

from __future__ import annotations

import base64
import json
import math
from pathlib import Path

import pytest
import torch
from common import checkpoint_dir, losses, pretrain_args, run, tensors

from lmforge.data.loader import BatchLoader
from lmforge.data.tokenizer import load_tokenizer
from lmforge.models import build_model
from lmforge.rundir import model_state_dict, run_model_config
from lmforge.train.checkpoint import _optimizer_state, load_checkpoint
from lmforge.train.optim import build_optimizer
from lmforge.train.pretrain import pretrain
from lmforge.train.schedule import lr_at


def trainer_state(ckpt: Path) -> dict:
    return json.loads((ckpt / "trainer_state.json").read_text())


def test_clean_stop_then_resume_restores_every_piece_of_state(debug_config, tmp_path):
    sections = {
        "train": {"max_steps": 8, "eval_every": 0, "sample_tokens": 0},
        "checkpoint": {"every_steps": 4},
    }
    straight = tmp_path / "straight"
    pretrain(debug_config(**sections), straight)
    stopped = tmp_path / "stopped"
    first_half = debug_config(**{**sections, "train": {**sections["train"], "max_steps": 4},
                                 "schedule": {"total_steps": 8}})  # fmt: skip
    pretrain(first_half, stopped)

    # Rebuild model, optimizer and loader as a resumed run does, load step 4, compare with what
    # the uninterrupted run had at step 4.
    cfg = debug_config(**sections, schedule={"total_steps": 8})
    tokenizer = load_tokenizer(stopped / "tokenizer.json")
    torch.manual_seed(12345)  # a different init and RNG position: loading must overwrite both
    model = build_model(run_model_config(cfg.model, cfg.data.seq_len, tokenizer.get_vocab_size()), "cpu")
    optimizer = build_optimizer(model, cfg.optim, "cpu")
    state = load_checkpoint(checkpoint_dir(stopped, 4), [model], [optimizer])
    want = checkpoint_dir(straight, 4)

    weights = tensors(want / "model")
    got = model_state_dict(model)
    assert got.keys() == weights.keys() and all(torch.equal(got[k], weights[k]) for k in got)
    moments, rest = _optimizer_state(model, optimizer)
    saved_moments = tensors(want / "optimizer")
    assert moments.keys() == saved_moments.keys() and moments
    assert all(torch.equal(moments[k], saved_moments[k]) for k in moments)
    assert {k: v["tensor"] for k, v in rest["scalars"].items()} == {
        k: v["tensor"] for k, v in trainer_state(want)["optimizer"]["scalars"].items()}  # fmt: skip
    rng = torch.frombuffer(
        bytearray(base64.b64decode(trainer_state(want)["rng"]["torch"])), dtype=torch.uint8
    )
    assert torch.equal(torch.get_rng_state(), rng)
    loader = BatchLoader(cfg.data.dir, "train", cfg.train.micro_batch_size, cfg.data.seq_len, cfg.train.seed)
    loader.load_state_dict(state["loader"])
    assert loader.state_dict() == trainer_state(want)["loader"] and loader.samples_seen == 4 * 8
    # The schedule is a function of the step: the first resumed step gets the uninterrupted run's LR.
    straight_lr = {r["step"]: r["lr"] for r in map(json.loads, (straight / "metrics.jsonl").read_text().splitlines())
                   if "lr" in r}  # fmt: skip
    assert lr_at(state["step"], cfg.schedule, cfg.optim.lr, cfg.schedule_steps) == straight_lr[5]

    pretrain(cfg, stopped, resume=True)
    assert losses(stopped) == losses(straight)  # exactly, step for step


def batch_hashes(run_dir: Path, rank: int) -> list[tuple[int, list[str]]]:
    """(step, hashes of the micro-batch's sequences) in the order rank `rank` trained them."""
    path = run_dir / "batches" / f"rank_{rank}.jsonl"
    return [(r["step"], r["samples"]) for r in map(json.loads, path.read_text().splitlines())]


def sequences_per_step(run_dir: Path, world_size: int, steps: range) -> dict[int, list[str]]:
    """Every sequence each step trained on, over all ranks, sorted."""
    seen: dict[int, list[str]] = {}
    for rank in range(world_size):
        for step, samples in batch_hashes(run_dir, rank):
            if step in steps:
                seen.setdefault(step, []).extend(samples)
    return {step: sorted(samples) for step, samples in seen.items()}


def test_resume_mid_epoch_with_loader_workers_on_2_ranks_sees_the_same_batches(prepared_dir, tmp_path):
    # seq_len 512: 181 windows, 8 per step, so the epoch ends during step 23, after the resume.
    common = ("--data.seq_len=512", "--train.micro_batch_size=4", "--logging.batch_hashes=true")
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    result = run(pretrain_args(prepared_dir, straight, *common, "--data.loader_workers=0", steps=24, every=10),
                 tmp_path, nproc=2)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    args = pretrain_args(prepared_dir, stopped, *common, steps=24, every=10)
    first = run([*args, "--data.loader_workers=2"], tmp_path, nproc=2, fault="train.step:term@step=12,rank=0")
    assert first.returncode == 0 and '"stopped_by"' in first.stdout, first.stderr[-3000:]
    second = run([*args, "--data.loader_workers=3", "--resume"], tmp_path, nproc=2)
    assert second.returncode == 0 and "step_0000013" in second.stdout, second.stderr[-3000:]

    for rank in (0, 1):
        assert batch_hashes(stopped, rank) == batch_hashes(straight, rank)
        assert [step for step, _ in batch_hashes(stopped, rank)] == list(range(1, 25))
    assert batch_hashes(straight, 0) != batch_hashes(straight, 1)  # each rank its own slice
    assert losses(stopped) == losses(straight)


@pytest.mark.slow  # 4 + 2 + 1 processes, ~40 s on 2 cores
def test_a_checkpoint_moves_from_4_to_2_to_1_processes(prepared_dir, tmp_path):
    single = tmp_path / "single"
    result = run(pretrain_args(prepared_dir, single, "--logging.batch_hashes=true", steps=12), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]

    chain = tmp_path / "chain"
    for nproc, until in ((4, 4), (2, 8), (1, 12)):
        args = pretrain_args(prepared_dir, chain, f"--train.micro_batch_size={8 // nproc}", "--schedule.total_steps=12",
                             "--logging.batch_hashes=true", steps=until)  # fmt: skip
        result = run([*args, *(["--resume"] if until > 4 else [])], tmp_path, nproc=nproc)
        assert result.returncode == 0, (nproc, result.stderr[-3000:])
        if until > 4:
            assert f"step_{until - 4:07d}" in result.stdout

    # The full state at each hand-over equals the single process's, up to the order of float sums
    # (Adam turns a last-bit gradient difference into up to ~0.1% of one LR-sized step: atol 1e-5).
    for step in (4, 8):
        want, got = checkpoint_dir(single, step), checkpoint_dir(chain, step)
        for kind in ("model", "optimizer"):
            expected, actual = tensors(want / kind), tensors(got / kind)
            assert expected.keys() == actual.keys()
            for name in expected:
                torch.testing.assert_close(actual[name], expected[name], rtol=1e-4, atol=1e-5,
                                           msg=lambda m, name=name, step=step: f"{name} after step {step}: {m}")  # fmt: skip
        assert trainer_state(got)["loader"] == trainer_state(want)["loader"]
        assert trainer_state(got)["optimizer"]["scalars"] == trainer_state(want)["optimizer"]["scalars"]
    # Every step trained on the same sequences as the single process: when the data-parallel
    # degree changed nothing was skipped and nothing seen twice.
    want_sequences = sequences_per_step(single, 1, range(1, 13))
    got_sequences = {**sequences_per_step(chain, 4, range(1, 5)), **sequences_per_step(chain, 2, range(5, 9)),
                     **sequences_per_step(chain, 1, range(9, 13))}  # fmt: skip
    assert got_sequences == want_sequences and all(len(s) == 8 for s in got_sequences.values())
    # And so does every loss, the first ones after each hand-over included.
    want, got = losses(single), losses(chain)
    assert sorted(got) == list(range(1, 13))
    for step in want:
        assert math.isclose(got[step], want[step], rel_tol=1e-5), (step, got[step], want[step])

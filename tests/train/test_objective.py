"""The loop takes any objective: a second, small one trains through the same loop, unchanged.

`EveryOtherTarget` learns only the odd positions' next tokens (targets -100 elsewhere), the shape of
what masked LM and SFT do, and adds a metric of its own to each evaluation. It runs through
`lmforge.train.loop.train` as pretraining does: logging, evaluation, checkpoints, exact resume.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lmforge.data.loader import BatchLoader
from lmforge.models import build_model
from lmforge.ops.cross_entropy import cross_entropy
from lmforge.rundir import run_model_config
from lmforge.train.metrics import read_metrics
from lmforge.train.objective import Batch, CausalLM
from lmforge.train.pretrain import pretrain
from lmforge.train.step import TrainStep


def odd_positions(targets: torch.Tensor) -> torch.Tensor:
    masked = targets.clone()
    masked[:, ::2] = -100  # cross_entropy's ignore_index
    return masked


class EveryOtherTarget(CausalLM):
    """A loss on a subset of positions, and one more evaluation metric."""

    pipeline_loss = None  # not written for the pipeline: parallel.pp > 1 refuses it

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        inputs, targets = batch
        return cross_entropy(model(inputs), odd_positions(targets))

    @torch.no_grad()
    def evaluate(self, step: TrainStep) -> dict:
        record = super().evaluate(step)
        assert step.model is not None
        losses = [cross_entropy(step.model(x), odd_positions(y)) for x, y in self.val_data]
        record["val_odd_loss"] = torch.stack(losses).mean().item()
        return record


SECTIONS = {
    "train": {"max_steps": 10, "eval_every": 5, "micro_batch_size": 4, "global_batch_tokens": 4 * 64 * 2,
              "sample_tokens": 0},
    "checkpoint": {"every_steps": 5},
}  # fmt: skip


def records(run_dir) -> list[dict]:
    return read_metrics(run_dir / "metrics.jsonl")


def test_a_second_objective_trains_through_the_loop_and_resumes_exactly(debug_config, tmp_path, prepared_dir):
    cfg = debug_config(**SECTIONS)
    subset, full = tmp_path / "subset", tmp_path / "full"
    result = pretrain(cfg, subset, objective=EveryOtherTarget)
    pretrain(cfg, full)

    # Step 1's loss is the objective's: the same weights and batches as the causal-LM run, and the
    # odd-position loss of those, computed here from the seeded model and the loader's first batches.
    torch.manual_seed(cfg.train.seed)
    model = build_model(run_model_config(cfg.model, cfg.data.seq_len, tokenizer_vocab=512))
    loader = BatchLoader(prepared_dir, "train", 4, cfg.data.seq_len, cfg.train.seed, 0, 1)
    expected = (
        sum(cross_entropy(model(x), odd_positions(y)) for x, y in (loader.next_batch(), loader.next_batch()))
        / 2
    )
    subset_log = [r for r in records(subset) if "loss" in r]
    full_log = [r for r in records(full) if "loss" in r]
    torch.testing.assert_close(torch.tensor(subset_log[0]["loss"]), expected.detach(), rtol=1e-5, atol=1e-6)
    assert subset_log[0]["loss"] != full_log[0]["loss"]
    assert subset_log[-1]["loss"] < subset_log[0]["loss"]  # it learns

    # The objective's own metric is in every evaluation record, and the result is the last one.
    evals = [r for r in records(subset) if "val_loss" in r]
    assert [r["step"] for r in evals] == [5, 10]
    assert all("val_odd_loss" in r for r in evals)
    assert result["step"] == 10 and result["val_odd_loss"] == evals[-1]["val_odd_loss"]

    # Checkpoint and resume through the same loop: 5 + 5 steps == 10 straight, loss for loss.
    halves = tmp_path / "halves"
    first = debug_config(**{**SECTIONS, "train": {**SECTIONS["train"], "max_steps": 5},
                            "schedule": {"total_steps": 10}})  # fmt: skip
    pretrain(first, halves, objective=EveryOtherTarget)
    pretrain(
        debug_config(**SECTIONS, schedule={"total_steps": 10}),
        halves,
        resume=True,
        objective=EveryOtherTarget,
    )
    halves_log = [r["loss"] for r in records(halves) if "loss" in r]
    assert halves_log == [r["loss"] for r in subset_log]


def test_an_objective_that_changes_the_loss_says_what_its_pipeline_computes(debug_config):
    """A subclass that overrides `loss` does not inherit next-token cross-entropy for the pipeline:
    under parallel.pp > 1 it is refused (before any work) unless it names its own pipeline_loss."""
    from lmforge.errors import ConfigError
    from lmforge.models import model_config
    from lmforge.parallel.mesh import ParallelDims
    from lmforge.train.pretrain import check_layout

    class Silent(CausalLM):
        def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
            return super().loss(model, batch) * 2

    class Explicit(Silent):
        pipeline_loss = staticmethod(cross_entropy)

    assert CausalLM.pipeline_loss is cross_entropy and Explicit.pipeline_loss is cross_entropy
    assert Silent.pipeline_loss is None and EveryOtherTarget.pipeline_loss is None
    cfg, model_cfg = debug_config(), model_config("llama", "debug")
    pipeline, cpu = ParallelDims(pp=2, dp_replicate=1, dp_shard=1, tp=1), torch.device("cpu")
    with pytest.raises(ConfigError, match="parallel.pp=2: the objective Silent has no pipeline_loss"):
        check_layout(cfg, model_cfg, pipeline, 2, cpu, Silent)
    check_layout(cfg, model_cfg, ParallelDims(pp=1, dp_replicate=1, dp_shard=1, tp=1), 1, cpu, Silent)

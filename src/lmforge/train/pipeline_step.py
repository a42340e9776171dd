"""The training and evaluation step of a pipeline-parallel run (parallel.pp > 1).

Every rank of a pp group loads the same (B, T) batch per step: the first stage's rank feeds the
inputs, the last stage's rank the targets; the schedule splits the batch into micro-batches and
runs forward and backward through the stages. See lmforge.parallel.pipeline for the pieces.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from lmforge.config import OptimConfig
from lmforge.parallel.pipeline import (
    build_pipeline_stages,
    build_schedule,
    clip_grad_norm_,
    pipeline_loss,
    sync_tied_embedding_grads,
)
from lmforge.train.optim import build_optimizer


def stages_per_rank(schedule: str) -> int:
    return 2 if schedule == "interleaved_1f1b" else 1


class PipelineStep:
    def __init__(
        self,
        model: nn.Module,
        optim: OptimConfig,
        schedule: str,
        pp_mesh: DeviceMesh,
        device: torch.device,
        n_microbatches: int,
        transform: Callable[[nn.Module], object],
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    ):
        """Prunes `model` to this rank's stages, applies `transform` to each (the transforms of
        lmforge.train.transforms: TP, FSDP, ...), then builds one optimizer per stage over its final
        (possibly sharded) parameters. loss_fn(last stage output, targets): a micro-batch's mean loss."""
        self.pp_mesh = pp_mesh
        self.stages, self.parts = build_pipeline_stages(model, pp_mesh, stages_per_rank(schedule), device)
        for part in self.parts:
            # In place (TP, FSDP2): a wrapper (DDP, a whole-model compile) would be lost here, and
            # pretrain refuses those for pipeline stages.
            wrapped = transform(part)
            assert wrapped is part, f"a pipeline stage was wrapped in {type(wrapped).__name__}"
        self.optimizers = [build_optimizer(part, optim, device.type) for part in self.parts]
        self.schedule = build_schedule(self.stages, n_microbatches, schedule, loss_fn)
        self.has_first = any(stage.is_first for stage in self.stages)
        self.has_last = any(stage.is_last for stage in self.stages)

    def _run(self, run, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        losses: list[torch.Tensor] = []
        # Stages check their inputs' strides against the first micro-batch's (torch 2.11 does):
        # a view such as window[:, :-1] would fail that check.
        inputs, targets = inputs.contiguous(), targets.contiguous()
        run(*([inputs] if self.has_first else []), target=targets if self.has_last else None,
            losses=losses if self.has_last else None)  # fmt: skip
        return pipeline_loss(self.stages, losses, self.pp_mesh)  # the same value on every pp rank

    def train_step(
        self, inputs: torch.Tensor, targets: torch.Tensor, max_norm: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward + backward over the micro-batches, then clip; returns (loss, grad_norm). No optimizer step."""
        loss = self._run(lambda *a, **k: self.schedule.step(*a, return_outputs=False, **k), inputs, targets)
        sync_tied_embedding_grads(self.parts, self.pp_mesh)
        grad_norm = clip_grad_norm_(self.parts, max_norm, self.pp_mesh)
        return loss, grad_norm

    @torch.no_grad()
    def evaluate(self, batches: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device) -> float:
        """Mean validation loss over `batches` (each split into the schedule's micro-batches)."""
        for part in self.parts:
            part.eval()
        total = torch.zeros((), device=device)
        for inputs, targets in batches:
            total += self._run(self.schedule.eval, inputs.to(device), targets.to(device))
        for part in self.parts:
            part.train()
        return total.item() / len(batches)

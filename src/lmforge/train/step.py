"""The one training step: forward, loss, backward over the micro-batches, clip, optimizer step.

The same object serves every layout: one process, DDP, FSDP2, tensor parallel (the model and
its wrappers come from lmforge.train.transforms) and the pipeline (lmforge.train.pipeline_step,
whose schedule runs forward and backward itself). `lmforge pretrain` and `lmforge bench` both
take their steps through it. Nothing here reads a value on the host: the loss and gradient norm
stay on the device until the loop logs them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from lmforge.adapt.lora import reset_adapters
from lmforge.adapt.sparsity import keep_zeros_after_step
from lmforge.config import (
    FreezeConfig,
    LoraConfig,
    OptimConfig,
    ParallelConfig,
    QatConfig,
    SparsityConfig,
    TrainConfig,
)
from lmforge.errors import ConfigError
from lmforge.faults import fault
from lmforge.models import FamilyConfig, FamilyModel, build_model
from lmforge.ops.cross_entropy import IGNORE_INDEX
from lmforge.parallel.apply import ModelLayout, gradient_sync
from lmforge.parallel.tensor import reduce_partial_grads
from lmforge.runtime import autocast
from lmforge.train.guards import skip_on_device
from lmforge.train.objective import AnyBatch, LossFn
from lmforge.train.optim import build_optimizer
from lmforge.train.pipeline_step import PipelineStep
from lmforge.train.transforms import apply_transforms, compile_enabled


class TrainStep:
    def __init__(
        self,
        model: FamilyModel | None,
        train_module: nn.Module | None,
        optimizers: list[torch.optim.Optimizer],
        device: torch.device,
        dtype: torch.dtype,
        grad_clip: float,
        pipe: PipelineStep | None = None,
        tensor_parallel: bool = False,
        dp_mesh: DeviceMesh | None = None,
    ):
        """model: the bare model (its parameters; None under a pipeline, whose stages are `pipe.parts`);
        train_module: what a micro-batch is fed to: the model, its DDP wrapper, or their compiled form.
        grad_clip: clip the global gradient norm to this (0: no clipping, the norm is still computed)."""
        self.model = model
        self.train_module = train_module
        self.optimizers = optimizers
        self.device = device
        self.dtype = dtype
        self.max_norm = grad_clip if grad_clip > 0 else float("inf")
        self.pipe = pipe
        self.tensor_parallel = tensor_parallel
        self.dp_mesh = dp_mesh  # the data-parallel ranks, for weighing losses by their targets
        # fp16 needs loss scaling; bf16 and fp32 do not (the scaler is then a no-op).
        self.scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    @property
    def parts(self) -> list[nn.Module]:
        """The modules holding this rank's parameters: the model, or its pipeline stages."""
        if self.pipe is not None:
            return self.pipe.parts
        assert self.model is not None
        return [self.model]

    @property
    def generates(self) -> bool:
        """Whether this rank's model can generate text (not a pipeline stage, not TP-sharded)."""
        return self.pipe is None and not self.tensor_parallel

    def set_lr(self, lr: float) -> None:
        for optimizer in self.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = lr

    def forward_backward(
        self, batches: Sequence[AnyBatch], loss_fn: LossFn, step: int, by_targets: bool = False
    ) -> tuple[Tensor, Tensor]:
        """Forward and backward over this rank's micro-batches of optimizer step `step`, then clip;
        returns (the mean loss of the batches, the global gradient norm before clipping), both on
        the device. The gradients are ready for `update`. loss_fn(train_module, batch): a
        micro-batch's mean loss (an objective's `loss`; a pipeline uses its schedule's loss_fn).

        by_targets: the micro-batches hold different numbers of targets (those not IGNORE_INDEX in
        batch[1]: SFT, masked LM): each micro-batch's mean is weighted by its share of the targets of
        the whole step on all data-parallel ranks, so the step trains on the mean over every target,
        whatever the layout (one small all-reduce and host read per step). Otherwise each
        micro-batch counts 1 / len(batches), as when every micro-batch has the same targets."""
        if self.pipe is not None:
            # The schedule splits the rank's whole batch into its own micro-batches.
            inputs, targets = (
                torch.cat(t).to(self.device, non_blocking=True) for t in zip(*batches, strict=True)
            )
            with autocast(self.device, self.dtype):
                loss_sum, grad_norm = self.pipe.train_step(inputs, targets, self.max_norm)
        else:
            loss_sum, grad_norm = self._accumulate(batches, loss_fn, step, self._weights(batches, by_targets))
        if fault("train.loss_value", step):
            loss_sum = loss_sum * float("nan")
        # The full value of a DTensor norm (FSDP/TP), once per step: the guards and the logging read it.
        return loss_sum, grad_norm.full_tensor() if isinstance(grad_norm, DTensor) else grad_norm

    def _weights(self, batches: Sequence[AnyBatch], by_targets: bool) -> list[float]:
        """What each micro-batch's mean loss is multiplied by (see forward_backward)."""
        if not by_targets:
            return [1.0 / len(batches)] * len(batches)
        counts = [int((batch[1] != IGNORE_INDEX).sum()) for batch in batches]  # host tensors: no sync
        total = torch.tensor(float(sum(counts)), device=self.device)
        ranks = 1
        if self.dp_mesh is not None:
            for dim in range(self.dp_mesh.ndim):  # HSDP: over both dimensions
                dist.all_reduce(total, group=self.dp_mesh.get_group(dim))
            ranks = self.dp_mesh.size()
        # Data parallelism averages gradients over the ranks: the factor `ranks` undoes that.
        return [count * ranks / max(total.item(), 1.0) for count in counts]

    def _accumulate(
        self, batches: Sequence[AnyBatch], loss_fn: LossFn, step: int, weights: list[float]
    ) -> tuple[Tensor, Tensor]:
        assert self.model is not None and self.train_module is not None
        loss_sum = torch.zeros((), device=self.device)
        for micro_step, batch in enumerate(batches):
            on_device = tuple(t.to(self.device, non_blocking=True) for t in batch)  # (inputs, targets[, ...])
            # Data-parallel gradients are reduced once, in the last micro-batch's backward.
            with gradient_sync(self.train_module, enabled=micro_step == len(batches) - 1):
                with autocast(self.device, self.dtype):
                    loss = loss_fn(self.train_module, on_device) * weights[micro_step]
                if fault("train.loss", step):
                    loss = loss * float("nan")
                self.scaler.scale(loss).backward()
            loss_sum += loss.detach()
        if fault("train.grad", step):  # nan: one parameter's gradient infinite, the loss finite
            grads = (param.grad for param in self.model.parameters() if param.grad is not None)
            next(grads).fill_(float("inf"))
        if self.tensor_parallel:
            reduce_partial_grads(self.model.parameters())  # sequence-parallel norms' gradients
        self.scaler.unscale_(self.optimizers[0])
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_norm)
        return loss_sum, grad_norm

    def update(self, skip: bool | Tensor) -> None:
        """The optimizer step, then the gradients are cleared. skip: True/False decided on the host;
        or the step's flags (lmforge.train.guards.step_flags), which a fused Adam/AdamW reads on the
        device to leave a non-finite step out without a host sync."""
        if isinstance(skip, Tensor):
            skip_on_device(self.optimizers, skip)
            return
        for optimizer in self.optimizers:
            if not skip:
                self.scaler.step(optimizer)  # with fp16, also skips a step whose gradients overflowed
            optimizer.zero_grad(set_to_none=True)
        if not skip or self.scaler.is_enabled():
            self.scaler.update()


def build_train_step(
    model_cfg: FamilyConfig,
    train: TrainConfig,
    parallel: ParallelConfig,
    optim: OptimConfig,
    layout: ModelLayout,
    device: torch.device,
    dtype: torch.dtype,
    pp_mesh: DeviceMesh | None = None,
    pipeline_loss: Callable[[Tensor, Tensor], Tensor] | None = None,
    meta_init: bool = False,
    freeze: FreezeConfig | None = None,
    lora: LoraConfig | None = None,
    sparsity: SparsityConfig | None = None,
    qat: QatConfig | None = None,
) -> TrainStep:
    """Build the model from `model_cfg` (seeded by the caller), transform it (lmforge.train.transforms)
    and build its optimizer(s): the step of one rank.

    pp_mesh: split the model into this rank's pipeline stages (parallel.pp_schedule,
    parallel.pp_microbatches), each transformed alike; pipeline_loss is the schedule's loss_fn.
    meta_init: build on the meta device and materialise only this rank's shards after TP/FSDP
    (sharded layouts of big models); otherwise the full model is built on the device from the
    seed, which is exactly the single-process initialisation."""
    compile = compile_enabled(train, device, pipeline=pp_mesh is not None)

    def transform(part: nn.Module) -> nn.Module:
        return apply_transforms(
            part, train, parallel, layout, device, dtype, compile, freeze, lora, sparsity, qat
        )

    tensor_parallel = layout.tp_mesh is not None
    if pp_mesh is not None:
        if pipeline_loss is None:
            raise ConfigError(
                "parallel.pp > 1: this objective cannot run as a pipeline (it has no pipeline_loss)"
            )
        if sparsity is not None and sparsity.keep_zeros:
            raise ConfigError("config key 'sparsity.keep_zeros' is not supported with parallel.pp > 1 yet")
        # The full model is built (same seed everywhere) and pruned to this rank's stages.
        n_microbatches = parallel.pp_microbatches or pp_mesh.size()
        pipe = PipelineStep(build_model(model_cfg, device), optim, parallel.pp_schedule, pp_mesh, device,
                            n_microbatches, transform, pipeline_loss)  # fmt: skip
        return TrainStep(None, None, pipe.optimizers, device, dtype, train.grad_clip, pipe, tensor_parallel)
    model = build_model(model_cfg, "meta" if meta_init else device)
    train_module = transform(model)
    if meta_init:
        model.to_empty(device=device)
        model.init_weights()
        reset_adapters(model)
    optimizer = build_optimizer(model, optim, device.type)
    keep_zeros_after_step(optimizer)  # sparsity.keep_zeros: also after Muon's steps (nothing without it)
    return TrainStep(model, train_module, [optimizer], device, dtype, train.grad_clip, None, tensor_parallel,
                     layout.dp_mesh)  # fmt: skip

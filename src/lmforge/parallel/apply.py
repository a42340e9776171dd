"""Parallel layouts applied to a single-device model from outside: checking a layout, the
data-parallel wrappers, and skipping gradient reduction during accumulation.

The order of every transform (TP, activation checkpointing, compile, FSDP2/DDP, ...) is
lmforge.train.transforms'. The model code itself never branches on the layout.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule
from torch.nn.parallel import DistributedDataParallel

from lmforge.config import ParallelConfig
from lmforge.errors import ConfigError
from lmforge.parallel.ddp import apply_ddp
from lmforge.parallel.fsdp import apply_fsdp
from lmforge.parallel.mesh import ParallelDims


def validate_layout(
    model_cfg, dims: ParallelDims, cfg: ParallelConfig, seq_len: int, local_batch: int
) -> None:
    """Fail before any work on a layout the model cannot take (one line naming the problem)."""
    if dims.tp > 1 and getattr(model_cfg, "qk_norm", False):
        raise ConfigError(
            f"parallel.tp={dims.tp}: model.qk_norm is not supported with tensor parallelism yet"
        )
    if dims.tp > 1:
        from lmforge.parallel.tensor import validate_tp

        try:
            validate_tp(model_cfg, dims.tp)
        except ValueError as err:
            raise ConfigError(f"parallel.tp={dims.tp}: {err}") from None
        if cfg.sequence_parallel and seq_len % dims.tp:
            raise ConfigError(
                f"parallel.tp={dims.tp} with sequence_parallel needs data.seq_len divisible by it, got {seq_len}"
            )
    if dims.pp > 1:
        from lmforge.parallel.pipeline import validate_pp

        if dims.dp_replicate > 1 and dims.dp_shard == 1:
            raise ConfigError(
                "parallel.pp > 1 with dp_replicate > 1 needs dp_shard > 1 (HSDP); DDP does not wrap stages"
            )
        if dims.tp > 1 and cfg.sequence_parallel:
            # Stage boundaries would carry sequence-sharded activations, which the next stage's
            # position tables do not expect yet.
            raise ConfigError("parallel.pp > 1 with tp > 1 needs parallel.sequence_parallel=false")
        n_microbatches = cfg.pp_microbatches or dims.pp
        stages = 2 if cfg.pp_schedule == "interleaved_1f1b" else 1
        try:
            validate_pp(model_cfg.n_layers, dims.pp, stages, local_batch, n_microbatches, cfg.pp_schedule)
        except ValueError as err:
            raise ConfigError(
                f"parallel.pp={dims.pp}, pp_schedule={cfg.pp_schedule}, pp_microbatches={n_microbatches}, "
                f"per-rank batch {local_batch} (train.micro_batch_size x accumulation): {err}"
            ) from None


@dataclass(frozen=True)
class ModelLayout:
    """Where one model (or pipeline stage) runs: its tensor-parallel mesh, and how data parallelism
    wraps it (`fsdp`: FSDP2, HSDP with a 2-D dp_mesh; `ddp`: DistributedDataParallel)."""

    tp_mesh: DeviceMesh | None = None
    dp_mesh: DeviceMesh | None = None
    data_parallel: Literal["none", "ddp", "fsdp"] = "none"


def layout_of(dims: ParallelDims, mesh: DeviceMesh | None) -> ModelLayout:
    """The layout a pretraining rank gives its model (or each of its pipeline stages)."""
    if mesh is None:
        return ModelLayout()
    tp_mesh = mesh["tp"] if dims.tp > 1 else None
    if dims.dp_shard > 1:
        dp_mesh = mesh["dp_replicate", "dp_shard"] if dims.dp_replicate > 1 else mesh["dp_shard"]
        return ModelLayout(tp_mesh, dp_mesh, "fsdp")
    if dims.dp_replicate > 1:
        if dims.tp > 1:
            raise ConfigError(
                "parallel.dp_replicate > 1 with tp > 1 needs dp_shard > 1 (HSDP); DDP does not take DTensors"
            )
        return ModelLayout(tp_mesh, mesh["dp_replicate"], "ddp")
    return ModelLayout(tp_mesh)


def apply_data_parallel(
    model: nn.Module,
    layout: ModelLayout,
    cfg: ParallelConfig,
    device: torch.device,
    compute_dtype: torch.dtype,
) -> nn.Module:
    """FSDP2 (in place) or DDP (a wrapper) per `layout`; returns the module the step calls."""
    if layout.data_parallel == "fsdp":
        assert layout.dp_mesh is not None
        if cfg.fsdp_cpu_offload and device.type != "cuda":
            raise ConfigError(
                "parallel.fsdp_cpu_offload moves GPU state to CPU memory: it needs train.device cuda"
            )
        reduce_dtype = torch.bfloat16 if cfg.fsdp_reduce_dtype == "bf16" else torch.float32
        param_dtype = None if compute_dtype == torch.float32 else compute_dtype
        apply_fsdp(model, layout.dp_mesh, param_dtype, reduce_dtype, cfg.fsdp_reshard_after_forward,
                   cfg.fsdp_cpu_offload)  # fmt: skip
        return model
    if layout.data_parallel == "ddp":
        assert layout.dp_mesh is not None
        return apply_ddp(model, layout.dp_mesh, device)
    return model


def gradient_sync(train_module: nn.Module, enabled: bool) -> contextlib.AbstractContextManager:
    """Skip the data-parallel gradient reduction on all but the last micro-step of accumulation.
    `train_module` is what the step calls: the model, its DDP wrapper, or their compiled form."""
    train_module = getattr(train_module, "_orig_mod", train_module)  # torch.compile's wrapper
    if isinstance(train_module, DistributedDataParallel):
        return contextlib.nullcontext() if enabled else train_module.no_sync()
    if isinstance(train_module, FSDPModule):
        train_module.set_requires_gradient_sync(enabled)
    return contextlib.nullcontext()

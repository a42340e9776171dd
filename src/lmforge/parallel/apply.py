"""Apply parallelism to a single-device model, from outside, in one documented order.

    1. tensor parallel (DTensor plans on attention and MLP)    parallel.tp > 1
    2. data parallel: FSDP2 / HSDP                              parallel.dp_shard > 1
                 or   DDP                                       parallel.dp_replicate > 1, dp_shard == 1
The model code itself never branches on the layout.
"""

from __future__ import annotations

import contextlib

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


def parallelize(
    model: nn.Module,
    dims: ParallelDims,
    mesh: DeviceMesh,
    cfg: ParallelConfig,
    device: torch.device,
    compute_dtype: torch.dtype,
) -> nn.Module:
    """Returns the module the training step calls (the model itself, or its DDP wrapper)."""
    if dims.tp > 1:
        from lmforge.parallel.tensor import apply_tensor_parallel

        apply_tensor_parallel(model, mesh["tp"], sequence_parallel=cfg.sequence_parallel)
    if dims.dp_shard > 1:
        if cfg.fsdp_cpu_offload and device.type != "cuda":
            raise ConfigError(
                "parallel.fsdp_cpu_offload moves GPU state to CPU memory: it needs train.device cuda"
            )
        dp_mesh = mesh["dp_replicate", "dp_shard"] if dims.dp_replicate > 1 else mesh["dp_shard"]
        reduce_dtype = torch.bfloat16 if cfg.fsdp_reduce_dtype == "bf16" else torch.float32
        param_dtype = None if compute_dtype == torch.float32 else compute_dtype
        apply_fsdp(
            model, dp_mesh, param_dtype, reduce_dtype, cfg.fsdp_reshard_after_forward, cfg.fsdp_cpu_offload
        )
        return model
    if dims.dp_replicate > 1:
        if dims.tp > 1:
            raise ConfigError(
                "parallel.dp_replicate > 1 with tp > 1 needs dp_shard > 1 (HSDP); DDP does not take DTensors"
            )
        return apply_ddp(model, mesh["dp_replicate"], device)
    return model


def gradient_sync(train_module: nn.Module, enabled: bool) -> contextlib.AbstractContextManager:
    """Skip the data-parallel gradient reduction on all but the last micro-step of accumulation."""
    if isinstance(train_module, DistributedDataParallel):
        return contextlib.nullcontext() if enabled else train_module.no_sync()
    if isinstance(train_module, FSDPModule):
        train_module.set_requires_gradient_sync(enabled)
    return contextlib.nullcontext()

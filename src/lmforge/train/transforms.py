"""Every change made to a single-device model before training, in one ordered list.

    1. convert        float8 linears, fused projections (module swaps)         train section
                      fake-quantized linears of QAT (lmforge.train.qat)         qat section
    2. freeze/adapt   frozen layers, LoRA adapters (lmforge.adapt)              freeze, lora sections
                      kept zeros of a pruned model (lmforge.adapt.sparsity)    sparsity section
    3. tensor parallel                                                          parallel section
    4. activation checkpointing                                                 train section
    5. compile        each block in place (compile_scope blocks)                train section
    6. FSDP2 / DDP    data parallelism                                          parallel section
    (7. compile_scope model: torch.compile of the module the step calls, around the DDP wrapper,
        so that Dynamo's DDPOptimizer can split the graph at gradient-bucket boundaries.)

Why this order: module swaps and adapters change which parameters exist, and every later
transform must see the final ones; TP shards those parameters before FSDP shards them again;
activation checkpointing and compile wrap a block's forward whatever its parameters are (in place:
nothing is traced before the first call, so compiling before fully_shard traces the same thing);
FSDP2 and DDP come last because they wrap the model as the other transforms left it, each block one
FSDP unit, with Dynamo skipping FSDP2's hooks. This is torchtitan's order. The same list is applied to a whole model or to each
pipeline stage; the model code never knows. `lmforge pretrain` and `lmforge bench` both call it.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

from lmforge.adapt.freeze import apply_freeze
from lmforge.adapt.lora import apply_lora
from lmforge.adapt.sparsity import apply_sparsity
from lmforge.config import FreezeConfig, LoraConfig, ParallelConfig, QatConfig, SparsityConfig, TrainConfig
from lmforge.errors import ConfigError
from lmforge.parallel.apply import ModelLayout, apply_data_parallel
from lmforge.parallel.tensor import apply_tensor_parallel
from lmforge.train.activation_checkpointing import apply_activation_checkpointing
from lmforge.train.compile import compile_blocks, cpu_compile_unavailable
from lmforge.train.converters import convert_model
from lmforge.train.qat import apply_qat, check_qat


def compile_enabled(train: TrainConfig, device: torch.device, pipeline: bool) -> bool:
    """train.compile, resolved: on by default on CUDA (on CPU the recipes that gain from it ask for it:
    docs/speed.md); never for pipeline stages (they run eagerly); off, after one warning line, on a
    CPU where torch.compile cannot build its kernels."""
    enabled = train.compile if train.compile is not None else device.type == "cuda"
    if not enabled or pipeline:
        return False
    return device.type != "cpu" or cpu_compile_unavailable() is None


def apply_transforms(
    model: nn.Module,
    train: TrainConfig,
    parallel: ParallelConfig,
    layout: ModelLayout,
    device: torch.device,
    compute_dtype: torch.dtype,
    compile: bool,
    freeze: FreezeConfig | None = None,
    lora: LoraConfig | None = None,
    sparsity: SparsityConfig | None = None,
    qat: QatConfig | None = None,
) -> nn.Module:
    """Transform `model` (a whole model or one pipeline stage, materialised or on the meta device)
    in place, in the order above; returns the module a training step calls (the model itself, its
    DDP wrapper, or the compiled form of either). Build the optimizer after this call."""
    tp = layout.tp_mesh.size() if layout.tp_mesh is not None else 1
    convert_model(model, train, tp, device)
    qat = qat or QatConfig()
    check_qat(qat, train, lora or LoraConfig(), tp, parallel.pp)
    apply_qat(model, qat)
    apply_freeze(model, freeze or FreezeConfig())
    lora = lora or LoraConfig()
    if lora.rank and tp > 1:
        raise ConfigError(f"config key 'lora.rank': LoRA is not supported with parallel.tp={tp} yet")
    apply_lora(model, lora)
    sparsity = sparsity or SparsityConfig()
    if sparsity.keep_zeros and (tp > 1 or layout.data_parallel == "fsdp"):
        raise ConfigError(
            "config key 'sparsity.keep_zeros' needs whole weights: not with FSDP (parallel.dp_shard > 1) or "
            "tensor parallelism (parallel.tp > 1); use parallel.dp_replicate (DDP)"
        )
    apply_sparsity(model, sparsity)  # after freezing and LoRA: only what trains gets a mask
    if layout.tp_mesh is not None:
        apply_tensor_parallel(model, layout.tp_mesh, sequence_parallel=parallel.sequence_parallel)
    apply_activation_checkpointing(model, train.activation_checkpointing)
    if compile and train.compile_scope == "blocks":
        compile_blocks(model, train.compile_mode)
    train_module = apply_data_parallel(model, layout, parallel, device, compute_dtype)
    if compile and train.compile_scope == "model":
        mode = None if train.compile_mode == "default" else train.compile_mode
        train_module = cast(nn.Module, torch.compile(train_module, mode=mode))  # an OptimizedModule
    return train_module

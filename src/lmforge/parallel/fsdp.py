"""Fully sharded data parallel with FSDP2 (`torch.distributed.fsdp.fully_shard`).

Each transformer block is its own FSDP unit, so only one block's full parameters exist at a time
(plus the root's: embeddings, final norm, head). With a 2-D mesh (dp_replicate, dp_shard) FSDP2
shards within a replica group and all-reduces across groups: HSDP.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of either family (`layers` in llama, `h` in gpt2)."""
    blocks = model.layers if hasattr(model, "layers") else model.h
    return list(blocks.values()) if isinstance(blocks, nn.ModuleDict) else list(blocks)


def apply_fsdp(
    model: nn.Module,
    dp_mesh: DeviceMesh,
    param_dtype: torch.dtype | None,
    reduce_dtype: torch.dtype,
    reshard_after_forward: bool = True,
    cpu_offload: bool = False,
) -> None:
    """Shard `model` in place over `dp_mesh` (1-D: FSDP; 2-D (replicate, shard): HSDP).

    param_dtype: the dtype parameters are all-gathered and computed in (None: their own dtype);
    reduce_dtype: the dtype gradients are reduce-scattered in (fp32 keeps the sum exact enough).
    """
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    kwargs = {"mesh": dp_mesh, "mp_policy": policy}
    if cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    blocks = transformer_blocks(model)
    for i, block in enumerate(blocks):
        # The last block's parameters are needed again at once by backward: keeping them gathered
        # saves one all-gather per step.
        fully_shard(block, reshard_after_forward=reshard_after_forward and i < len(blocks) - 1, **kwargs)
    # The root (embeddings, final norm, head) keeps its parameters gathered after forward: backward
    # starts with the head at once, so resharding would only buy a second all-gather of it.
    fully_shard(model, reshard_after_forward=False, **kwargs)

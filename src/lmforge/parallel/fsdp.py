"""Fully sharded data parallel with FSDP2 (`torch.distributed.fsdp.fully_shard`).

Each transformer block is its own FSDP unit, so only one block's full parameters exist at a time
(plus the root's: embeddings, final norm, head). With a 2-D mesh (dp_replicate, dp_shard) FSDP2
shards within a replica group and all-reduces across groups: HSDP.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

from lmforge.models import blocks


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
    # OffloadPolicy() is fully_shard's default: no offloading.
    offload = CPUOffloadPolicy() if cpu_offload else OffloadPolicy()
    model_blocks = list(blocks(model).values())
    for i, block in enumerate(model_blocks):
        # The last block's parameters are needed again at once by backward: keeping them gathered
        # saves one all-gather per step.
        last = i == len(model_blocks) - 1
        fully_shard(
            block,
            mesh=dp_mesh,
            reshard_after_forward=reshard_after_forward and not last,
            mp_policy=policy,
            offload_policy=offload,
        )
    # The root (embeddings, final norm, head) keeps its parameters gathered after forward: backward
    # starts with the head at once, so resharding would only buy a second all-gather of it.
    fully_shard(model, mesh=dp_mesh, reshard_after_forward=False, mp_policy=policy, offload_policy=offload)

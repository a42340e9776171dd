"""Replicated data parallel: PyTorch's DistributedDataParallel, one full model copy per rank.

Gradients are all-reduced (averaged) during backward, bucketed and overlapped with compute.
With gradient accumulation only the last micro-step communicates (`no_sync` on the others).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.nn.parallel import DistributedDataParallel


def apply_ddp(model: nn.Module, dp_mesh: DeviceMesh, device: torch.device) -> DistributedDataParallel:
    """Wrap `model` (already on `device`); DDP broadcasts rank 0's weights to the others."""
    device_ids = [device.index] if device.type == "cuda" else None
    # broadcast_buffers=False: the only buffers (RoPE tables) are computed identically on every
    # rank; re-broadcasting them every step would be pure traffic.
    return DistributedDataParallel(
        model, device_ids=device_ids, process_group=dp_mesh.get_group(), broadcast_buffers=False
    )

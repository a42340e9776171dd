"""The process layout: torch.distributed set-up and one DeviceMesh built from the parallel config.

The mesh has four named dimensions, outermost first: `pp`, `dp_replicate`, `dp_shard`, `tp`
(a dimension of size 1 is kept, so code can always ask for it by name). Tensor-parallel ranks are
adjacent, so on a multi-GPU node they share the fastest links; pipeline stages are outermost,
since they exchange only activations at stage boundaries.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.rendezvous import rendezvous

from lmforge.config import ParallelConfig
from lmforge.errors import ConfigError

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "tp")


@dataclass(frozen=True)
class ParallelDims:
    pp: int
    dp_replicate: int
    dp_shard: int
    tp: int

    @property
    def world_size(self) -> int:
        return self.pp * self.dp_replicate * self.dp_shard * self.tp

    @property
    def dp(self) -> int:
        """Data-parallel degree: how many different micro-batches are processed at once."""
        return self.dp_replicate * self.dp_shard

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_dims(cfg: ParallelConfig, world_size: int) -> ParallelDims:
    """Fill in dp_shard=-1 and check that the degrees multiply to the world size."""
    others = cfg.dp_replicate * cfg.tp * cfg.pp
    dp_shard = cfg.dp_shard
    if dp_shard == -1:
        if world_size % others:
            raise ConfigError(
                f"parallel layout: dp_replicate*tp*pp = {others} does not divide the world size {world_size}"
            )
        dp_shard = world_size // others
    dims = ParallelDims(pp=cfg.pp, dp_replicate=cfg.dp_replicate, dp_shard=dp_shard, tp=cfg.tp)
    if dims.world_size != world_size:
        raise ConfigError(
            f"parallel layout: pp*dp_replicate*dp_shard*tp = {cfg.pp}*{cfg.dp_replicate}*{dp_shard}*{cfg.tp} "
            f"= {dims.world_size}, but the world size is {world_size}"
        )
    return dims


def world_size_from_env() -> int:
    """WORLD_SIZE as set by torchrun (1 for a plain `python`/`lmforge` process)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(device: torch.device, timeout_s: int) -> None:
    """Join the torchrun job: NCCL on GPUs, gloo on CPU; collectives time out after timeout_s."""
    if dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if restart == 0:
        dist.init_process_group(backend=backend, timeout=timeout)
        return
    # A job torchrun restarted after a failure: torchrun shares its rendezvous store with the
    # workers and keeps it across restarts, so the process-group keys found there are the dead
    # attempt's and connecting to them fails (pytorch/pytorch#135712; seen with gloo, torch 2.13).
    # The keys of each attempt get their own prefix.
    store, rank, world_size = next(rendezvous("env://", timeout=timeout))
    store = dist.PrefixStore(f"lmforge/attempt_{restart}/", store)
    dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size, timeout=timeout)


def local_device(device: torch.device) -> torch.device:
    """Under torchrun each process takes the GPU of its LOCAL_RANK."""
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return device


def build_mesh(dims: ParallelDims, device: torch.device) -> DeviceMesh:
    sizes = (dims.pp, dims.dp_replicate, dims.dp_shard, dims.tp)
    return init_device_mesh(device.type, sizes, mesh_dim_names=MESH_DIMS)


def dp_rank(mesh: DeviceMesh, dims: ParallelDims) -> int:
    """This rank's index among the data-parallel ranks (which slice of each global batch it reads)."""
    return mesh.get_local_rank("dp_replicate") * dims.dp_shard + mesh.get_local_rank("dp_shard")

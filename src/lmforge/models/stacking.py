"""Stacked projection weights for decoding: a family's modules that hold several linear layers on
one input (Llama's q, k and v; its SwiGLU gate and up) read them as one matrix while a compiled
decode batch runs (lmforge.infer.generate.DecodeBatch), so a decode step makes one matrix-vector
product where it made three or two.

The parameters keep their names and their objects (optimizer state, checkpoints and exports are
unchanged): their data become views of the stacked matrix's rows, which takes the place of the
separate matrices in memory, so nothing is held twice. Leaving the block gives each parameter its own
storage again. Only plain layers are stacked: a LoRA, quantized, float8, sharded (DTensor) or
biased layer leaves its module as it is, and a model FSDP2 shards is left whole (its last block's
weights are gathered plain tensors between forwards, which FSDP2 fills in place). A model copied
(deepcopy) inside the block keeps the stacked classes, with its own copies of the weights: copy
it outside.

Measured (llama tiny, batch 1, 2 threads, compiled decoding, alternated in one process): 43
matrix-vector products a step become 25; with the cache attention written out for small query
counts (lmforge.models.kv_cache.attend_cache) about 10% more tokens/s (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor


@dataclass(frozen=True)
class Stacked:
    """The class a module becomes (its forward reads `self.stacked`) and its linear layers' names, in
    the stacked matrix's row order."""

    module: type[nn.Module]
    linears: tuple[str, ...]


def _stackable(linears: list[nn.Linear]) -> bool:
    weights = [linear.weight for linear in linears if type(linear) is nn.Linear]
    return (
        len(weights) == len(linears)
        and all(linear.bias is None for linear in linears)
        and all(type(w.data) is torch.Tensor and w.is_contiguous() for w in weights)
        and len({(w.dtype, w.device, w.size(1)) for w in weights}) == 1
    )


def _sharded(model: nn.Module) -> bool:
    return any(isinstance(p.data, DTensor) for p in model.parameters()) or any(
        isinstance(m, FSDPModule) for m in model.modules()
    )


@contextlib.contextmanager
def stacked_weights(model: nn.Module, stacked_modules: Mapping[type[nn.Module], Stacked]) -> Iterator[int]:
    """Within the block, every module of `model` listed in `stacked_modules` (FamilySpec.stacked_modules)
    whose layers are plain reads their weights as one stacked matrix; yields how many were stacked."""
    swapped: list[tuple[nn.Module, type[nn.Module], list[nn.Linear]]] = []
    try:
        with _ordinary_tensors():
            for module in [] if _sharded(model) else model.modules():
                entry = stacked_modules.get(type(module))
                linears: list[nn.Linear] = [getattr(module, name) for name in entry.linears] if entry else []
                if entry is None or not _stackable(linears):
                    continue
                stacked = torch.cat([linear.weight for linear in linears])  # (sum of outs, in)
                for linear, rows in zip(
                    linears, stacked.split([lin.out_features for lin in linears]), strict=True
                ):
                    linear.weight.data = rows  # the old storage is freed here
                module.stacked = stacked  # a plain attribute: not a parameter, not in the state dict
                original, module.__class__ = type(module), entry.module
                swapped.append((module, original, linears))
        yield len(swapped)
    finally:
        for module, original, _ in swapped:  # every class back first: a copy that fails leaves
            module.__class__ = original  # no module reading a stacked matrix
            module.__dict__.pop("stacked", None)
        with _ordinary_tensors():
            for _, _, linears in swapped:
                for linear in linears:
                    linear.weight.data = linear.weight.data.clone()  # its own storage again


@contextlib.contextmanager
def _ordinary_tensors() -> Iterator[None]:
    """No autograd, and ordinary tensors even under the caller's inference mode: the parameters must
    stay trainable after the block."""
    with torch.inference_mode(False), torch.no_grad():
        yield

"""Stacked projection weights for decoding: a family's modules that hold several linear layers on
one input (Llama's q, k and v; its SwiGLU gate and up) read them as one matrix while a KV cache is
set up (lmforge.infer.generate.DecodeBatch), so a decode step makes one matrix-vector product where
it made three or two.

The parameters keep their names and their objects (optimizer state, checkpoints and exports are
unchanged): their data become views of the stacked matrix's rows, which takes the place of the
separate matrices in memory, so nothing is held twice. Leaving the block gives each parameter its own
storage again. Only plain layers are stacked: a LoRA, quantized, float8, sharded (DTensor) or
biased layer leaves its module as it is.

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


@contextlib.contextmanager
def stacked_weights(model: nn.Module, stacked_modules: Mapping[type[nn.Module], Stacked]) -> Iterator[int]:
    """Within the block, every module of `model` listed in `stacked_modules` (FamilySpec.stacked_modules)
    whose layers are plain reads their weights as one stacked matrix; yields how many were stacked."""
    swapped: list[tuple[nn.Module, type[nn.Module], list[nn.Linear]]] = []
    try:
        for module in model.modules():
            entry = stacked_modules.get(type(module))
            linears: list[nn.Linear] = [getattr(module, name) for name in entry.linears] if entry else []
            if entry is None or not _stackable(linears):
                continue
            with torch.no_grad():
                stacked = torch.cat([linear.weight for linear in linears])  # (sum of outs, in)
                rows = 0
                for linear in linears:
                    n = linear.weight.size(0)
                    linear.weight.data = stacked[rows : rows + n]  # the old storage is freed here
                    rows += n
            swapped.append((module, type(module), linears))
            module.stacked = stacked  # a plain attribute: not a parameter, not in the state dict
            module.__class__ = entry.module
        yield len(swapped)
    finally:
        for module, original, linears in reversed(swapped):
            module.__class__ = original
            del module.stacked
            with torch.no_grad():
                for linear in linears:
                    linear.weight.data = linear.weight.data.clone()  # its own storage again

"""torch.compile, applied from outside the model, after parallelism and activation checkpointing.

Scopes (`train.compile_scope`):
- `blocks`: each transformer block is compiled in place (`nn.Module.compile`), as torchtitan does.
  The blocks share their code, so Dynamo traces it once and every block reuses the graph: compile
  time does not grow with depth, and parameter names (checkpoints) do not change. Embedding, final
  norm and the loss stay eager; FSDP2's hooks stay outside the compiled region.
- `model`: the whole step module in one graph (cross-block fusion; longer compile; under DDP the
  graph is split at gradient-bucket boundaries by Dynamo's DDPOptimizer).

Modes (`train.compile_mode`) are torch.compile's: `default`; `reduce-overhead` records CUDA graphs,
which removes the per-kernel launch cost when shapes are static (they are in training, fixed
micro-batch and sequence length); `max-autotune` also benchmarks GEMM and Triton configurations at
compile time (minutes); `max-autotune-no-cudagraphs` does that without the CUDA graphs.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

CompileScope = Literal["model", "blocks"]
CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]


def transformer_blocks(model: nn.Module) -> nn.ModuleDict:
    """The blocks of a llama (`layers`) or gpt2 (`h`) model or pipeline stage, keyed by global index."""
    return model.layers if hasattr(model, "layers") else model.h


def apply_compile(
    step_module: nn.Module, model: nn.Module, scope: CompileScope, mode: CompileMode
) -> nn.Module:
    """What the step should call: `step_module` compiled whole, or as is with `model`'s blocks
    compiled in place. `model` is the bare model (or stage) inside `step_module` (DDP wraps it)."""
    options = {"mode": None if mode == "default" else mode}
    if scope == "model":
        return torch.compile(step_module, **options)
    for block in transformer_blocks(model).values():
        block.compile(**options)
    return step_module

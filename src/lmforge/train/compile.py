"""torch.compile, applied from outside the model (its place in the order: lmforge.train.transforms).

Scopes (`train.compile_scope`):
- `blocks`: each transformer block is compiled in place (`nn.Module.compile`) before FSDP2 wraps
  it, as torchtitan does.
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

from torch import nn

from lmforge.models import blocks

CompileScope = Literal["model", "blocks"]
CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]


def compile_blocks(model: nn.Module, mode: CompileMode) -> None:
    """Compile each block of `model` (a whole model or a pipeline stage) in place. Scope `model`
    is torch.compile of the module the step calls: see lmforge.train.transforms."""
    for block in blocks(model).values():
        block.compile(mode=None if mode == "default" else mode)

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

import functools
import warnings
from typing import Literal

import torch
from torch import nn

from lmforge.config import one_line
from lmforge.models import blocks

CompileScope = Literal["model", "blocks"]
CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]


def compile_blocks(model: nn.Module, mode: CompileMode) -> None:
    """Compile each block of `model` (a whole model or a pipeline stage) in place. Scope `model`
    is torch.compile of the module the step calls: see lmforge.train.transforms."""
    for block in blocks(model).values():
        block.compile(mode=None if mode == "default" else mode)


@functools.cache
def cpu_compile_unavailable() -> str | None:
    """Why torch.compile cannot run on this CPU (Inductor builds C++ kernels: no working compiler,
    no Python headers), or None where it can. Found by compiling a two-op function once per process
    (about a second); the first failure warns in one line, and the caller trains eagerly."""
    try:
        # arange, not randn: the probe must not draw from the global RNG (the model is initialised after).
        torch.compile(lambda x: torch.relu(x) * 2.0, fullgraph=True)(torch.arange(8.0))
    # Whatever the toolchain raises: BackendCompilerFailed, InductorError, CalledProcessError, OSError.
    except Exception as err:
        why = one_line(f"{type(err).__name__}: {err}").split(" Set TORCHDYNAMO_VERBOSE")[0][:300]
        warnings.warn(f"torch.compile does not work on this CPU, training eagerly: {why}", stacklevel=2)
        return why
    return None

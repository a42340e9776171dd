"""Float8 training of the linear layers inside the blocks (`train.float8`), by torchao.

torchao's `Float8Linear` casts each matmul's input, weight and output gradient to float8 with one
dynamic scale per tensor ("tensorwise" recipe) and multiplies them with `torch._scaled_mm`; the
weights, optimizer state and everything outside those matmuls keep their precision. On an H100 the
float8 tensor cores have twice the bf16 peak (1979 vs 989 TFLOP/s dense, NVIDIA's H100 datasheet),
so the large matmuls of a 1B+ model get faster; the casts cost memory bandwidth, which small
models do not win back.

Left in high precision: the output head (the vocab projection, whose logits set the loss: torchtitan
leaves it out too) and any layer whose dimensions are not multiples of 16, which `_scaled_mm`
requires. The fused loss reads the head's weight directly, so it is not affected either way.
"""

from __future__ import annotations

import torch
from torch import nn

from lmforge.errors import ConfigError
from lmforge.models import spec_of
from lmforge.runtime import require_float8_gpu


def check_float8_device(device: torch.device) -> None:
    """float8 matmuls need an NVIDIA GPU of compute capability >= 8.9 (Ada, Hopper, Blackwell)."""
    require_float8_gpu(device, "config key 'train.float8'")


def apply_float8(model: nn.Module) -> int:
    """Swap the eligible nn.Linear layers of `model` for torchao's Float8Linear in place (before
    TP/FSDP and compile); returns how many were swapped."""
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError:
        raise ConfigError("config key 'train.float8' needs torchao: pip install torchao") from None
    in_blocks = (
        f"{spec_of(model).blocks}."  # the output head (and anything outside the blocks) stays as it is
    )

    def eligible(module: nn.Module, fqn: str) -> bool:
        return (
            isinstance(module, nn.Linear)
            and fqn.startswith(in_blocks)
            and module.in_features % 16 == 0
            and module.out_features % 16 == 0
        )

    before = sum(isinstance(m, nn.Linear) for m in model.modules())
    convert_to_float8_training(model, module_filter_fn=eligible, config=Float8LinearConfig())
    after = sum(type(m) is nn.Linear for m in model.modules())
    return before - after

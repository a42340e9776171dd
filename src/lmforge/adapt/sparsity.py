"""Keeping a pruned model's zeros through training (the `sparsity` config section).

With `sparsity.keep_zeros`, a weight of a linear layer inside the blocks that is exactly zero when
training starts (in `train.init`: a model `lmforge compress prune` made) stays exactly zero, so a
recovery fine-tune keeps the pruned pattern:

- its gradient is set to zero there (the weight's mask) by a hook on the parameter that runs
  before the gradient is accumulated: clipping, the data-parallel reduction (DDP) and the optimizer
  see only the kept weights' gradients. With AdamW or Adam, whose moments start at zero, a zero
  gradient is a zero update, weight decay included (it scales a zero weight by a factor).
- Muon orthogonalises the whole update matrix, and that update is NOT zero where the gradient is:
  so the weights are also set to zero there after every optimizer step
  (`keep_zeros_after_step`, a step post-hook on the optimizer), which makes every optimizer exact.

The mask is recorded at a weight's first gradient, from the weight as it is then, not when this
transform is applied: transforms run on the freshly built model, before train.init's weights (or a
resumed checkpoint's, which hold the same zeros) are loaded into it. Frozen weights (frozen layers,
LoRA's base weights) get no gradient and no update: they need no mask.

Applied at step 2 of lmforge.train.transforms (after freezing and LoRA have decided what trains,
before tensor parallelism, compile and data parallelism wrap the parameters). A sharded layout
(FSDP2, TP) would hand the hooks shards of a weight: it is refused, as are pipeline stages.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lmforge.config import SparsityConfig
from lmforge.models import blocks

MASK_ATTRIBUTE = "zero_mask"  # on a parameter whose zeros are kept: its ZeroMask


class ZeroMask:
    """The zeros of one weight: its gradient is zero there (`mask_gradient`), and so is the weight
    after each optimizer step (`reapply`). Recorded lazily (bool, the weight's shape; True: a zero).
    masked_fill rather than a product with the mask: a non-finite value times 0 is not 0."""

    def __init__(self, weight: Tensor) -> None:
        self.weight = weight
        self.zeros: Tensor | None = None

    def mask_gradient(self, grad: Tensor) -> Tensor:
        if self.zeros is None:  # the first backward: the weights are those training starts from
            self.zeros = self.weight.detach() == 0
        return grad.masked_fill(self.zeros, 0.0)

    @torch.no_grad()
    def reapply(self) -> None:
        if self.zeros is not None:
            self.weight.masked_fill_(self.zeros, 0.0)


def apply_sparsity(model: nn.Module, cfg: SparsityConfig) -> int:
    """With cfg.keep_zeros, give every trainable weight of a linear layer in the blocks of `model` (a
    whole model) a ZeroMask and its gradient hook; returns how many weights (0 without keep_zeros)."""
    if not cfg.keep_zeros:
        return 0
    count = 0
    for block in blocks(model).values():
        for module in block.modules():
            if isinstance(module, nn.Linear) and module.weight.requires_grad:
                zero_mask = ZeroMask(module.weight)
                setattr(module.weight, MASK_ATTRIBUTE, zero_mask)
                module.weight.register_hook(zero_mask.mask_gradient)
                count += 1
    return count


def keep_zeros_after_step(optimizer: torch.optim.Optimizer) -> None:
    """After every step of `optimizer`, zero each of its parameters that has a ZeroMask where it was zero."""
    masks = [
        getattr(param, MASK_ATTRIBUTE)
        for group in optimizer.param_groups
        for param in group["params"]
        if hasattr(param, MASK_ATTRIBUTE)
    ]

    def reapply(optimizer: torch.optim.Optimizer, args: object, kwargs: object) -> None:
        for zero_mask in masks:
            zero_mask.reapply()

    if masks:
        optimizer.register_step_post_hook(reapply)

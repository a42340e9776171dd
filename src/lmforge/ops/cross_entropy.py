"""Next-token cross-entropy, two ways: from logits, and straight from the last hidden state.

`cross_entropy(logits, targets)`: the plain loss, in fp32 whatever the logits' dtype. Every stage
(pretraining, evaluation, the pipeline's last stage, bench) uses this one function.

`linear_cross_entropy(hidden, weight, targets)`: the same loss of `hidden @ weight.T` without ever
holding the (N, vocab) logits. With N = 16 x 1024 tokens and GPT-2's 50,304-token vocabulary the
logits are 1.6 GB in bf16, their fp32 upcast 3.3 GB, and autograd keeps a softmax of the same size
for backward; here the head's matmul, the softmax and the gradient are done `chunk_size` rows at a
time in the forward pass (the loss is a scalar, so its gradient is known then), and backward only
scales the stored gradients. Memory: one (chunk, vocab) fp32 block plus the gradients of hidden
and weight. The idea is the one of Liger-Kernel's fused linear cross-entropy (Hsu et al. 2024,
arXiv:2410.10989); this is a plain-PyTorch implementation of it, checked against `cross_entropy`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# A target of IGNORE_INDEX has no loss and no gradient (PyTorch's and Hugging Face's convention):
# the prompt of a supervised fine-tuning example, padding, the unmasked positions of masked LM.
IGNORE_INDEX = -100


def cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean next-token loss over the targets that are not IGNORE_INDEX (0, not NaN, when there is
    none: a micro-batch of prompts only). logits (B, T, V) any float dtype, targets (B, T) int64 -> () fp32."""
    targets = targets.flatten()
    total = F.cross_entropy(logits.float().flatten(0, 1), targets, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (targets != IGNORE_INDEX).sum().clamp(min=1)


def exp_in_place(logits: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """logits (C, V) fp32, overwritten -> (log-sum-exp (C,), exp(logits - row max) (C, V): the
    overwritten tensor, row sums of it (C,)); the softmax is the second divided by the third.

    No second (C, V) tensor: half the time of logsumexp followed by sub_ and exp_ on the project's
    CPU (58 against 116 ms at 1,024 x 50,304; benchmarks/ce_softmax.py)."""
    row_max = logits.amax(dim=-1)  # (C,)
    exps = logits.sub_(row_max[:, None]).exp_()  # (C, V)
    row_sum = exps.sum(dim=-1)  # (C,)
    return row_max + row_sum.log(), exps, row_sum


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, hidden: Tensor, weight: Tensor, targets: Tensor, chunk_size: int, grad_enabled: bool
    ) -> Tensor:
        # hidden (N, D) in the compute dtype, weight (V, D), targets (N,) int64 (IGNORE_INDEX: no loss)
        n_tokens = hidden.shape[0]
        compute_dtype = hidden.dtype
        # Only the gradients autograd will ask for are computed: a frozen head (fine-tuning with
        # LoRA or freeze.*) skips its (V, D) weight gradient, a no_grad evaluation both
        # (needs_input_grad follows requires_grad whatever the grad mode: grad_enabled says which).
        want_hidden, want_weight = (grad_enabled and ctx.needs_input_grad[i] for i in (0, 1))
        weight_c = weight.to(compute_dtype)  # (V, D): a no-op unless autocast runs in bf16/fp16
        grad_hidden = torch.empty_like(hidden) if want_hidden else None  # (N, D)
        grad_weight = (
            torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_weight else None
        )  # (V, D)
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        counted = targets != IGNORE_INDEX  # (N,) the positions that have a loss
        for start in range(0, n_tokens, chunk_size):
            h = hidden[start : start + chunk_size]  # (C, D)
            keep = counted[start : start + chunk_size]  # (C,)
            t = targets[start : start + chunk_size].clamp(min=0)  # (C,) ignored rows: any index, zeroed below
            logits = (h @ weight_c.t()).float()  # (C, V) fp32: the only logits ever held
            target_logit = logits.gather(1, t[:, None]).squeeze(1)  # (C,), before logits is overwritten
            lse, exps, row_sum = exp_in_place(logits)
            loss += ((lse - target_logit) * keep).sum()
            if not (want_hidden or want_weight):
                continue
            # d(sum of losses)/d logits = softmax - one_hot(target), computed in place; an ignored
            # row's gradient is zeroed on the D-wide side (h, and grad_hidden), never V-wide.
            grad_logits = exps.div_(row_sum[:, None])  # (C, V) softmax
            grad_logits[torch.arange(len(t), device=t.device), t] -= 1.0
            grad_logits = grad_logits.to(compute_dtype)
            if grad_hidden is not None:
                grad_hidden[start : start + chunk_size] = (grad_logits @ weight_c) * keep[:, None]  # (C, D)
            if grad_weight is not None:
                grad_weight += (grad_logits.t() @ (h * keep[:, None])).float()  # (V, D)
        # the mean over the counted positions (no host sync: the count stays on the device); a
        # micro-batch without one (a prompt cut before its answer) has loss and gradient 0, not NaN
        scale = 1.0 / counted.sum().clamp(min=1).to(torch.float32)
        ctx.save_for_backward(grad_hidden, grad_weight, scale)
        ctx.weight_dtype = weight.dtype
        return loss * scale

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        grad_hidden, grad_weight, scale = ctx.saved_tensors
        factor = grad_loss * scale  # () fp32
        # grad_hidden * factor, not * factor.to(bf16): the product is taken in fp32 and rounded once
        # (a bf16 1/N would scale every element by up to 2^-9 too much or too little)
        return (grad_hidden * factor if grad_hidden is not None else None,
                (grad_weight * factor).to(ctx.weight_dtype) if grad_weight is not None else None,
                None, None, None)  # fmt: skip


# Under torch.compile the model's graph ends before this function, which runs eagerly (its chunk
# loop is a handful of large matmuls): tracing it has not been tried on a GPU yet.
@torch.compiler.disable
def linear_cross_entropy(
    hidden: Tensor, weight: Tensor, targets: Tensor, chunk_size: int = 4096, only_counted: bool = False
) -> Tensor:
    """Mean next-token loss of `hidden @ weight.T` without materialising the logits.

    hidden (B, T, D) or (N, D), weight (V, D) the output head, targets (B, T) or (N,) int64 in
    [0, V) or IGNORE_INDEX (no loss there; the mean is over the others). Returns () fp32; gradients flow to hidden and weight (a tied head's gradient reaches
    the embedding through the shared parameter).

    only_counted: first gather the rows that have a target, so the head's matmul skips the others
    (masked LM, where 15% of the positions count: the head's FLOPs drop by about 85%). It costs a
    host sync (the number of rows), so next-token pretraining, where nearly every row counts, leaves
    it off.
    """
    hidden, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    if targets.numel() == 0:
        raise ValueError("linear_cross_entropy needs at least one target")
    if only_counted:  # none counted: 0 rows, and the loss and gradients are 0
        counted = targets != IGNORE_INDEX  # (N,)
        hidden, targets = hidden[counted], targets[counted]
    return _LinearCrossEntropy.apply(hidden, weight, targets, chunk_size, torch.is_grad_enabled())

"""What one rank holds in memory during a training step of lmforge: a model of its tensors.

Two parts, each checked exactly against the tensors of real runs (tests/plan/test_memory.py and the
gloo runs of tests/plan/test_comm.py):

`state_bytes(cfg, dims, ...)`: the parameters, gradients and optimizer states of one rank, from the
parameter shapes (a meta-device model, nothing allocated) and the way lmforge's layouts split them:
fp32 master parameters (mixed precision is autocast or FSDP's param_dtype cast), gradients of the
same shape (FSDP2 and TP: the local shard; DDP: the whole model), AdamW's two moments of the same
shape plus one fp32 step counter per parameter tensor.

`activation_bytes(cfg, rows, seq_len, ...)`: the bytes autograd saves for backward in one
micro-batch's forward, as `torch.autograd.graph.saved_tensors_hooks` sees them (storages counted
once, parameters and buffers left out). What each block saves is the family's own account of its
model file (models/<family>/memory.py, `FamilySpec.saved_bytes`); this module adds the blocks, the
embeddings and the loss: the token ids (int64), the final norm, and the fused loss
(lmforge.ops.cross_entropy.linear_cross_entropy), which keeps the gradients it computes in forward,
of the last hidden state (cD per token, c the compute dtype's bytes) and of the head (4 V D); the
plain loss (tp or pp > 1) keeps the head's input (cD), the fp32 log-softmax (4V per token) and the
targets.

Activation checkpointing replaces a checkpointed block's saved tensors by its input (the stream:
c bytes per element); backward then holds one block's tensors again while it recomputes it, which
the planner adds (`ActivationBytes.per_block`).

Tensor parallelism divides what lives on heads and MLP channels by tp and, with sequence
parallelism, the norms by tp too; the linears keep their gathered full-sequence input (DTensor
saves it). tests/plan/test_comm.py checks that on every rank of its gloo layouts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lmforge.models import FamilyConfig, spec_of
from lmforge.parallel.mesh import ParallelDims
from lmforge.plan.comm import MASTER_BYTES, _Inventory, checkpointed_blocks

# Optimizer state per parameter element and per parameter tensor, in fp32: AdamW keeps two moments
# (exp_avg, exp_avg_sq) and a step counter tensor; SGD with momentum one buffer; AdaGrad one sum
# and a step.
OPTIMIZER_STATE = {"adamw": (2, 1), "adam": (2, 1), "sgd": (1, 0), "adagrad": (1, 1)}

# The rows linear_cross_entropy computes at once (its chunk_size default): one (chunk, V) fp32 block
# of logits and its compute-dtype copy are alive during the loss's forward.
LOSS_CHUNK = 4096


@dataclass(frozen=True)
class StateBytes:
    """Bytes of one rank's parameters, gradients and optimizer states (the largest rank's shard)."""

    params: int
    grads: int
    optimizer: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer


def rank_stages(dims: ParallelDims, pp_rank: int, pp_schedule: str) -> tuple[list[int], int]:
    """(the pipeline stages rank pp_rank holds, the number of stages): lmforge's loop-style placement,
    rank r holds stages r, r + pp, ... (two per rank for interleaved_1f1b)."""
    per_rank = 2 if dims.pp > 1 and pp_schedule == "interleaved_1f1b" else 1
    n_stages = dims.pp * per_rank
    return list(range(pp_rank, n_stages, dims.pp)), n_stages


def state_bytes(
    cfg: FamilyConfig,
    dims: ParallelDims,
    pp_rank: int = 0,
    pp_schedule: str = "1f1b",
    optimizer: str = "adamw",
) -> StateBytes:
    """Parameters, gradients and optimizer states of pipeline rank `pp_rank`, on its TP and FSDP
    rank 0 (torch.chunk gives the first ranks the larger chunks: rank 0 holds the most)."""
    if optimizer not in OPTIMIZER_STATE:
        raise ValueError(
            f"no state model for optimizer {optimizer!r}; choose one of {sorted(OPTIMIZER_STATE)}"
        )
    inventory = _Inventory.of(cfg)
    stages, n_stages = rank_stages(dims, pp_rank, pp_schedule)
    numel = grad_numel = n_tensors = 0
    # Under TP without FSDP, the gradient of a rowwise (vocab- or position-sharded) embedding comes
    # back Replicate: every rank holds it whole until the optimizer step (FSDP reduce-scatters it;
    # a token embedding tied to the colwise head gets the head's sharded gradient).
    plan = inventory.plan
    embeddings = {plan.position_embedding} | (set() if plan.tied else {plan.embedding})
    if dims.tp == 1 or dims.dp_shard > 1:
        embeddings = set()
    embeddings.discard(None)  # a family without position embeddings
    for stage in stages:
        for p in inventory.stage_params(stage, n_stages):
            # FSDP2 pads dim 0 to a multiple of dp_shard; each rank then holds 1/dp_shard of it.
            local = inventory.tp_local_numel(p, dims.tp, dims.dp_shard) // dims.dp_shard
            numel += local
            grad_numel += math.prod(p.shape) if p.root_module in embeddings else local
            n_tensors += 1
    per_element, per_tensor = OPTIMIZER_STATE[optimizer]
    return StateBytes(
        numel * MASTER_BYTES,
        grad_numel * MASTER_BYTES,
        (per_element * numel + per_tensor * n_tensors) * MASTER_BYTES,
    )


@dataclass(frozen=True)
class ActivationBytes:
    """What one micro-batch's forward leaves for backward on one rank, by where it comes from."""

    blocks: int  # the rank's blocks (checkpointed ones: their input only)
    per_block: int  # one block not checkpointed (what recomputing a checkpointed one holds again)
    other: int  # embeddings, final norm, loss, RoPE tables, norm-weight copies

    @property
    def total(self) -> int:
        return self.blocks + self.other


def activation_bytes(
    cfg: FamilyConfig,
    rows: int,
    seq_len: int,
    compute_bytes: int = 2,
    activation_checkpointing: str = "none",
    blocks: range | list[int] | None = None,
    first: bool = True,
    last: bool = True,
    tp: int = 1,
    sequence_parallel: bool = True,
    fused_loss: bool | None = None,
    norm_stat_bytes: int = 4,
    param_bytes: int | None = None,
) -> ActivationBytes:
    """Bytes saved for backward by one micro-batch of `rows` sequences of `seq_len` tokens.

    compute_bytes: the dtype the matmuls compute in (2: bf16; 4: fp32). param_bytes: the dtype of
    the parameters as the forward sees them (default compute_bytes: fp32, or bf16 under FSDP2's
    param_dtype; 4 with compute_bytes 2: fp32 parameters under bf16 autocast, lmforge's mixed
    precision without FSDP). The residual stream has the parameters' dtype.
    blocks: the global indices of the blocks this rank runs (default: all); first, last: whether it
    runs the embeddings, and the final norm and loss. fused_loss: default as pretrain resolves it
    (on unless tp or pp > 1). norm_stat_bytes: GPT-2's LayerNorm mean and rstd (fp32 on CUDA, the
    input's dtype on CPU).
    """
    blocks = range(cfg.n_layers) if blocks is None else blocks
    if fused_loss is None:
        fused_loss = tp == 1 and first and last
    tokens = rows * seq_len
    c, D, V = compute_bytes, cfg.dim, cfg.vocab_size
    sp = tp if sequence_parallel else 1  # the norms see 1/sp of the sequence
    p = compute_bytes if param_bytes is None else param_bytes
    saved = spec_of(cfg).saved_bytes(cfg, c, p, norm_stat_bytes, tp)  # the family's models/<family>/memory.py
    per_block = (
        tokens * saved.norms // sp + tokens * saved.inputs + tokens * saved.sharded // tp + saved.block_fixed
    )
    other = (seq_len * saved.block_positions if blocks else 0) + (
        seq_len * saved.first_positions if first else 0
    )
    stream = p * D  # a checkpointed block keeps its input (the stream) only
    n_checkpointed = checkpointed_blocks(blocks, activation_checkpointing)
    n_kept = len(blocks) - n_checkpointed
    saved_blocks = n_kept * per_block + n_checkpointed * tokens * stream // sp
    if first:
        other += 8 * tokens + tokens * saved.first_norm // sp  # the token ids (and an embedding norm)
    if last:
        other += tokens * saved.final_norm // sp + saved.final_fixed
        if fused_loss:
            # the gradients of the hidden state and the head, and 1 / the number of targets
            other += tokens * (stream + saved.fused_loss) + 4 * V * D + 4
        else:
            # the head's input, the fp32 log-softmax, the targets (int64), nll_loss's total weight and
            # the number of targets the mean divides by (int64; lmforge.ops.cross_entropy)
            other += tokens * (c * D + 4 * math.ceil(V / tp) * tp + 8) + 4 + 8
            if c != p:  # autocast's bf16 copy of the head's weight
                other += c * math.ceil(V / tp) * D
    return ActivationBytes(saved_blocks, per_block, other)


def loss_transient_bytes(
    cfg: FamilyConfig, rows: int, seq_len: int, compute_bytes: int, fused_loss: bool
) -> int:
    """Bytes alive only while the loss's forward runs: the fused loss's (chunk, V) fp32 logits and
    their compute-dtype softmax; the plain loss's logits and their fp32 upcast for the whole batch."""
    n = min(LOSS_CHUNK, rows * seq_len) if fused_loss else rows * seq_len
    return n * cfg.vocab_size * (4 + compute_bytes)

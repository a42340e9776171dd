"""How many bytes each parallel layout moves per training step: a model of lmforge's communication.

`comm_per_step(model_cfg, dims, micro_batch_size, seq_len, ...)` returns the collectives that one
rank issues in one optimizer step, by kind and by mesh dimension, computed from the model's
parameter shapes (a meta-device model, nothing allocated) and from what lmforge's layouts do:

    DDP    (dp_replicate > 1, dp_shard == 1)  all-reduce of every gradient, bucketed, once per step
           (no buffer broadcast: apply_ddp sets broadcast_buffers=False)
    FSDP2  (dp_shard > 1)                     per unit (each block, then the root: embeddings,
           final norm, head): all-gather of the parameters in forward and again in backward if it
           reshards after forward (every block but the last; never the root), reduce-scatter of the gradients
           once per step; HSDP (dp_replicate > 1 too) then all-reduces the gradient shards across
           the replicas
    TP     (tp > 1)                           per block, per micro-batch: with sequence parallelism
           an all-gather before each sub-block and a reduce-scatter after it, and the transposes in
           backward; without it an all-reduce after each sub-block in forward and one per colwise
           linear in backward; plus the embedding, the head's input and the full logits
    PP     (pp > 1)                           point-to-point: activations forward and their
           gradients backward at every stage boundary, per pipeline micro-batch

and the small ones: the gradient-norm all-reduces of clip_grad_norm_, the pipeline's loss and
tied-embedding exchanges, and the sequence-parallel norm-weight gradients. Every rule here was
checked against the collectives a CPU gloo run actually issues (tests/plan/test_comm.py) for the
debug Llama; docs/communication.md lists the formulas and what is not modelled.

What "bytes" means: the size of the message passed to the collective, the way torch.distributed
takes it: the full (gathered) output of an all-gather, the full input of a reduce-scatter, the
tensor of an all-reduce or a broadcast, the tensor of a send. `CommVolume.wire_bytes()` converts
that into the bytes a rank sends with ring algorithms: (n-1)/n x size for all-gather,
reduce-scatter and broadcast, 2(n-1)/n x size for all-reduce, the size itself for a send.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

from lmforge.models import FamilyConfig, blocks, build_model, spec_of
from lmforge.models.spec import TensorParallelPlan
from lmforge.parallel.mesh import ParallelDims
from lmforge.parallel.pipeline import split_points, validate_pp
from lmforge.parallel.tensor import validate_tp

KINDS = ("all_gather", "reduce_scatter", "all_reduce", "broadcast", "p2p")

# train.activation_checkpointing -> which blocks are checkpointed: those whose global index is a
# multiple of this (lmforge.train.activation_checkpointing); 0: none.
AC_MODES = {"none": 0, "selective": 2, "full": 1}


def checkpointed_blocks(blocks: range | list[int], mode: str) -> int:
    """How many of these blocks (global indices) activation checkpointing `mode` recomputes."""
    every = AC_MODES[mode]
    return sum(1 for b in blocks if every and b % every == 0)


# lmforge keeps parameters, their gradients and the optimizer state in fp32 (mixed precision is
# autocast, or FSDP's param_dtype cast for the all-gather): DDP reduces fp32 gradients, and the
# gradient norm, the tied-embedding exchange and the pipeline loss are fp32.
MASTER_BYTES = 4

# DistributedDataParallel's defaults: the first bucket closes at 1 MiB, the others at 25 MiB;
# buffers are broadcast in buckets of 250 MiB.
DDP_FIRST_BUCKET_BYTES = 1024 * 1024
DDP_BUCKET_BYTES = 25 * 1024 * 1024
DDP_BROADCAST_BUCKET_BYTES = 250 * 1024 * 1024

# Tensor parallel with sequence parallelism and no FSDP: a norm weight is replicated but computed
# on a sequence shard, so its gradient is a Partial DTensor; the trainer reduces it once a step,
# before clipping (lmforge.parallel.tensor.reduce_partial_grads). Left Partial, every use would
# redistribute it again (4 times a step on torch 2.13). Under FSDP, FSDP redistributes it once in
# backward.
SP_NORM_GRAD_REDUCTIONS_WITHOUT_FSDP = 1


@dataclass(frozen=True)
class CommVolume:
    """The collectives one rank issues in one optimizer step (all its micro-batches).

    all_gather ... p2p: message bytes by kind, summed over the mesh dimensions (p2p: bytes sent).
    by_dim[dim][kind]: message bytes; calls[dim][kind]: number of collective calls, for the mesh
    dimensions "pp", "dp_replicate", "dp_shard", "tp" (only those with traffic appear).
    group_sizes[dim]: the ranks in that dimension's groups. pp_rank: the pipeline rank described
    (ranks of one pipeline stage all move the same; stages differ).
    """

    all_gather: int
    reduce_scatter: int
    all_reduce: int
    broadcast: int
    p2p: int
    by_dim: dict[str, dict[str, int]]
    calls: dict[str, dict[str, int]]
    group_sizes: dict[str, int]
    pp_rank: int = 0

    @property
    def total(self) -> int:
        return self.all_gather + self.reduce_scatter + self.all_reduce + self.broadcast + self.p2p

    @property
    def n_calls(self) -> int:
        return sum(n for kinds in self.calls.values() for n in kinds.values())

    def wire_bytes_by_dim(self) -> dict[str, dict[str, int]]:
        """Bytes this rank sends, by mesh dim and kind, with ring algorithms (NCCL's large-message
        default): (n-1)/n of the message for all-gather, reduce-scatter and broadcast, 2(n-1)/n
        for all-reduce, the message itself for a send."""
        sent: dict[str, dict[str, int]] = {}
        for dim, kinds in self.by_dim.items():
            n = self.group_sizes[dim]
            sent[dim] = {
                kind: size if kind == "p2p" else (2 if kind == "all_reduce" else 1) * (n - 1) * size // n
                for kind, size in kinds.items()
            }
        return sent

    def wire_bytes(self) -> dict[str, int]:
        """Bytes this rank sends per kind, summed over the mesh dims (wire_bytes_by_dim)."""
        sent = dict.fromkeys(KINDS, 0)
        for kinds in self.wire_bytes_by_dim().values():
            for kind, size in kinds.items():
                sent[kind] += size
        return sent

    def summary(self) -> str:
        """One line per (dim, kind): message bytes and calls, for logs and docs."""
        lines = [f"pp rank {self.pp_rank}: {self.total / 2**30:.3f} GiB in {self.n_calls} calls"]
        for dim in sorted(self.by_dim):
            for kind in KINDS:
                if kind in self.by_dim[dim]:
                    lines.append(f"  {dim:12s} {kind:14s} {self.by_dim[dim][kind] / 2**30:10.3f} GiB "
                                 f"{self.calls[dim][kind]:6d} calls")  # fmt: skip
        return "\n".join(lines)


def comm_per_step(
    model_cfg: FamilyConfig,
    dims: ParallelDims,
    micro_batch_size: int,
    seq_len: int,
    grad_accum: int = 1,
    param_bytes: int = 2,
    grad_reduce_bytes: int = 4,
    activation_bytes: int = 2,
    reshard_after_forward: bool = True,
    sequence_parallel: bool = True,
    pp_microbatches: int | None = None,
    pp_schedule: str = "1f1b",
    residual_bytes: int | None = None,
    pp_rank: int | None = None,
    activation_checkpointing: str = "none",
) -> CommVolume:
    """The communication of one rank in one optimizer step of `lmforge pretrain` with layout `dims`.

    micro_batch_size: sequences per forward per data-parallel rank (train.micro_batch_size);
    grad_accum: micro-batches per rank per step. Under pp > 1 the rank's micro_batch_size *
    grad_accum sequences are one pipeline batch, split into pp_microbatches (default pp), as in
    lmforge's pretrain.
    param_bytes: FSDP's all-gather dtype (parallel param_dtype: 2 for bf16 compute, 4 for fp32).
    grad_reduce_bytes: FSDP's reduce-scatter (and HSDP all-reduce) dtype (parallel.fsdp_reduce_dtype;
    4 by default). DDP always reduces lmforge's fp32 gradients.
    activation_bytes: the compute dtype: matmul outputs and the logits.
    residual_bytes: the residual stream's dtype (embedding output, norms, stage outputs); default:
    param_bytes under FSDP (its cast parameters make the whole forward run in param_dtype), else
    4 (fp32 parameters under autocast keep the residual stream in fp32).
    pp_rank: which pipeline rank to describe; default: the one with the most bytes.
    activation_checkpointing: none, selective or full (train.activation_checkpointing): backward
    recomputes the forward of the checkpointed blocks, and with it their tensor-parallel collectives.
    """
    _validate(model_cfg, dims, micro_batch_size, seq_len, grad_accum, sequence_parallel)
    if activation_checkpointing not in AC_MODES:
        raise ValueError(
            f"activation_checkpointing must be one of {AC_MODES}, got {activation_checkpointing!r}"
        )
    inventory = _Inventory.of(model_cfg)
    if dims.pp > 1:
        stages_per_rank = 2 if pp_schedule == "interleaved_1f1b" else 1
        n_microbatches = pp_microbatches or dims.pp
        pipeline_batch = micro_batch_size * grad_accum
        try:
            validate_pp(
                model_cfg.n_layers, dims.pp, stages_per_rank, pipeline_batch, n_microbatches, pp_schedule
            )
        except ValueError as err:
            raise ValueError(f"pipeline layout: {err}") from None
        passes, rows = n_microbatches, pipeline_batch // n_microbatches
    else:
        stages_per_rank, passes, rows = 1, grad_accum, micro_batch_size
    step = _Step(
        inventory=inventory,
        dims=dims,
        n_stages=dims.pp * stages_per_rank,
        passes=passes,
        rows=rows,
        seq_len=seq_len,
        param_bytes=param_bytes,
        grad_reduce_bytes=grad_reduce_bytes,
        activation_bytes=activation_bytes,
        residual_bytes=residual_bytes or (param_bytes if dims.dp_shard > 1 else MASTER_BYTES),
        reshard_after_forward=reshard_after_forward,
        sequence_parallel=sequence_parallel,
        activation_checkpointing=activation_checkpointing,
    )
    if pp_rank is not None:
        if not 0 <= pp_rank < dims.pp:
            raise ValueError(f"pp_rank={pp_rank} is not in [0, {dims.pp})")
        return step.rank_volume(pp_rank)
    return max((step.rank_volume(r) for r in range(dims.pp)), key=lambda v: v.total)


def _validate(model_cfg, dims: ParallelDims, micro_batch_size: int, seq_len: int, grad_accum: int,
              sequence_parallel: bool) -> None:  # fmt: skip
    for name, value in (("micro_batch_size", micro_batch_size), ("seq_len", seq_len), ("grad_accum", grad_accum),
                        ("pp", dims.pp), ("dp_replicate", dims.dp_replicate), ("dp_shard", dims.dp_shard),
                        ("tp", dims.tp)):  # fmt: skip
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if dims.tp > 1:
        validate_tp(model_cfg, dims.tp)
        if sequence_parallel and seq_len % dims.tp:
            raise ValueError(f"sequence parallelism needs seq_len divisible by tp={dims.tp}, got {seq_len}")
        if dims.dp_replicate > 1 and dims.dp_shard == 1:
            raise ValueError(
                "dp_replicate > 1 with tp > 1 needs dp_shard > 1 (HSDP): lmforge's DDP takes no DTensors"
            )
        if dims.pp > 1 and sequence_parallel:
            raise ValueError(
                "pp > 1 with tp > 1 needs sequence_parallel=False: lmforge's pipeline refuses it"
            )
    if dims.pp > 1 and dims.dp_replicate > 1 and dims.dp_shard == 1:
        raise ValueError(
            "pp > 1 with dp_replicate > 1 needs dp_shard > 1 (HSDP): lmforge's DDP does not wrap stages"
        )


# ---------------------------------------------------------------------------------------------------
# What each family's parameters are, where they live, and how tensor parallelism splits them
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _FamilyPlan:
    first: tuple[str, ...]  # root modules only the first pipeline stage holds
    last: tuple[str, ...]  # root modules only the last pipeline stage holds
    embedding: str  # the input embedding, whose weight a tied head shares
    tp_shard_dim: dict[str, int]  # parameter name (in a block: relative to it) -> dim TP splits
    norms: frozenset[str]  # norm modules (in a block: relative to it), replicated under TP
    position_embedding: str | None  # a (max_seq_len, dim) table added to the token embeddings
    tied: bool
    n_rowwise: int  # rowwise linears per block: one per sub-block, whose output TP reduces
    n_colwise: int  # colwise linears per block: each takes an input whose gradient TP reduces

    def is_norm(self, param_name: str) -> bool:
        """Whether the parameter (in a block: named relative to it) is a norm's weight or bias."""
        return param_name.rpartition(".")[0] in self.norms


# The dim of a module's (out, in) weight that each kind of a family's tensor-parallel plan splits
# (lmforge.parallel.tensor): colwise by output rows, rowwise by input columns, the embeddings by
# vocab (or position) rows, the head colwise by vocab rows. Norms are replicated.
_WEIGHT_SHARD_DIM = {"colwise": 0, "rowwise": 1, "embedding": 0, "position_embedding": 0, "head": 0}
_BIAS_SHARDED = ("colwise", "head")  # a rowwise bias is replicated, added once


def _tp_shard_dims(plan: TensorParallelPlan) -> dict[str, int]:
    dims = {}
    for entries in (plan.root, plan.block):
        for module, kind in entries.items():
            if isinstance(kind, str) and kind in _WEIGHT_SHARD_DIM:
                dims[f"{module}.weight"] = _WEIGHT_SHARD_DIM[kind]
                if kind in _BIAS_SHARDED:
                    dims[f"{module}.bias"] = 0
    return dims


def _family_plan(cfg: FamilyConfig) -> _FamilyPlan:
    """What the family's spec says about where its parameters live and how TP splits them."""
    spec = spec_of(cfg)
    plan, layout = spec.tp_plan, spec.stages
    block_kinds = list(plan.block.values())
    return _FamilyPlan(
        first=layout.first,
        last=layout.last,
        embedding=layout.embedding,
        tp_shard_dim=_tp_shard_dims(plan),
        norms=frozenset(
            name for entries in (plan.root, plan.block) for name, kind in entries.items() if kind == "norm"
        ),
        position_embedding=next(
            (name for name, kind in plan.root.items() if kind == "position_embedding"), None
        ),
        tied=layout.ties_embeddings(cfg),
        n_rowwise=block_kinds.count("rowwise"),
        n_colwise=block_kinds.count("colwise"),
    )


@dataclass(frozen=True)
class _Param:
    name: str  # in a block: relative to the block ("attention.wq.weight"); else the full name
    shape: tuple[int, ...]
    block: int | None  # the transformer block holding it; None: a root parameter
    root_module: str | None  # the root module holding it (an embedding, the head); None in a block
    is_norm: bool  # a norm's weight or bias (replicated under TP)
    tensor_id: int  # tied names share it


@dataclass(frozen=True)
class _Inventory:
    cfg: FamilyConfig
    plan: _FamilyPlan
    params: tuple[_Param, ...]  # every name, tied ones twice
    buffer_bytes: int  # of the whole model (a pipeline stage copy keeps all of them)
    n_layers: int
    dim: int
    vocab_size: int

    @classmethod
    def of(cls, cfg: FamilyConfig) -> _Inventory:
        key = repr(cfg)  # configs are mutable dataclasses, not hashable; their repr lists every field
        if key not in _INVENTORIES:
            _INVENTORIES[key] = cls._build(cfg)
        return _INVENTORIES[key]

    @classmethod
    def _build(cls, cfg: FamilyConfig) -> _Inventory:
        plan = _family_plan(cfg)
        model = build_model(cfg, "meta")  # shapes only, nothing allocated
        # In registration order, which DDP's buckets follow (reversed: the order gradients are ready).
        block_index = {id(block): i for i, block in enumerate(blocks(model).values())}
        block_of = {
            f"{name}.": block_index[id(m)] for name, m in model.named_modules() if id(m) in block_index
        }
        params = []
        for name, p in model.named_parameters(remove_duplicate=False):
            prefix = next((pre for pre in block_of if name.startswith(pre)), None)
            if prefix is not None:
                in_block = name.removeprefix(prefix)
                params.append(_Param(in_block, tuple(p.shape), block_of[prefix], None,
                                     plan.is_norm(in_block), id(p)))  # fmt: skip
            elif name.split(".")[0] in plan.first + plan.last:
                params.append(
                    _Param(name, tuple(p.shape), None, name.split(".")[0], plan.is_norm(name), id(p))
                )
        n_named = sum(1 for _ in model.named_parameters(remove_duplicate=False))
        if len(params) != n_named:
            raise ValueError(
                f"{type(model).__name__} has parameters outside its blocks and known root modules"
            )
        buffer_bytes = sum(b.numel() * b.element_size() for b in model.buffers())
        return cls(cfg, plan, tuple(params), buffer_bytes, cfg.n_layers, cfg.dim, cfg.vocab_size)

    def stage_blocks(self, stage: int, n_stages: int) -> range:
        bounds = (
            [0, *split_points(self.n_layers, n_stages), self.n_layers] if n_stages > 1 else [0, self.n_layers]
        )
        return range(bounds[stage], bounds[stage + 1])

    def stage_params(self, stage: int, n_stages: int) -> list[_Param]:
        """The parameters of pipeline stage `stage` (the whole model for one stage), tied ones once."""
        blocks = self.stage_blocks(stage, n_stages)
        roots = (self.plan.first if stage == 0 else ()) + (self.plan.last if stage == n_stages - 1 else ())
        seen, out = set(), []
        for p in self.params:
            keep = p.block in blocks if p.block is not None else p.root_module in roots
            if keep and p.tensor_id not in seen:
                seen.add(p.tensor_id)
                out.append(p)
        return out

    def tp_local_numel(self, p: _Param, tp: int, dp_shard: int = 1) -> int:
        """Elements of p on TP rank 0 (the largest chunk), its dim 0 padded to a multiple of dp_shard."""
        shape = list(p.shape)
        dim = self.plan.tp_shard_dim.get(p.name)
        if dim is not None and tp > 1:
            shape[dim] = math.ceil(shape[dim] / tp)  # torch.chunk: the first ranks get the larger chunks
        shape[0] = math.ceil(shape[0] / dp_shard) * dp_shard  # FSDP pads dim 0 to shard evenly
        return math.prod(shape)

    def tp_counts(self) -> tuple[int, int]:
        """(rowwise, colwise) linears per block: sub-blocks, and inputs whose gradient TP reduces."""
        return self.plan.n_rowwise, self.plan.n_colwise


_INVENTORIES: dict[str, _Inventory] = {}  # a planner sweeping layouts builds each meta model once


# ---------------------------------------------------------------------------------------------------
# One step of one rank
# ---------------------------------------------------------------------------------------------------


class _Tally:
    def __init__(self) -> None:
        self.bytes: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self.calls: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))

    def add(self, dim: str, kind: str, nbytes: int, count: int = 1) -> None:
        if count > 0 and nbytes > 0:
            self.bytes[dim][kind] += nbytes * count
            self.calls[dim][kind] += count

    def add_calls(self, dim: str, kind: str, total_bytes: int, calls: int) -> None:
        """`calls` collectives that move `total_bytes` between them (e.g. DDP's unequal buckets)."""
        if calls > 0 and total_bytes > 0:
            self.bytes[dim][kind] += total_bytes
            self.calls[dim][kind] += calls


@dataclass(frozen=True)
class _Step:
    inventory: _Inventory
    dims: ParallelDims
    n_stages: int
    passes: int  # forward+backward passes per step: grad_accum, or pipeline micro-batches
    rows: int  # sequences per pass
    seq_len: int
    param_bytes: int
    grad_reduce_bytes: int
    activation_bytes: int
    residual_bytes: int
    reshard_after_forward: bool
    sequence_parallel: bool
    activation_checkpointing: str = "none"

    def rank_volume(self, pp_rank: int) -> CommVolume:
        dims, tally = self.dims, _Tally()
        stages = list(range(pp_rank, self.n_stages, dims.pp))
        rank_params: list[_Param] = []
        for stage in stages:
            params = self.inventory.stage_params(stage, self.n_stages)
            rank_params += params
            if dims.dp_shard > 1:
                self._fsdp(tally, stage, params)
            elif dims.dp_replicate > 1:
                self._ddp(tally, params)
            if dims.tp > 1:
                self._tensor_parallel(tally, stage)
            if dims.pp > 1:
                self._pipeline(tally, stage)
        self._gradient_norm(tally, stages, rank_params)
        if dims.pp > 1:
            self._tied_embedding_sync(tally, stages)
            tally.add("pp", "all_reduce", MASTER_BYTES)  # pipeline_loss: the step's loss on every pp rank
        by_dim = {dim: dict(kinds) for dim, kinds in tally.bytes.items()}
        totals = {kind: sum(kinds.get(kind, 0) for kinds in by_dim.values()) for kind in KINDS}
        sizes = {"pp": dims.pp, "dp_replicate": dims.dp_replicate, "dp_shard": dims.dp_shard, "tp": dims.tp}
        return CommVolume(
            **totals,
            by_dim=by_dim,
            calls={dim: dict(kinds) for dim, kinds in tally.calls.items()},
            group_sizes=sizes,
            pp_rank=pp_rank,
        )

    def _fsdp(self, tally: _Tally, stage: int, params: list[_Param]) -> None:
        """FSDP2 units: each block, then the stage's root parameters; HSDP adds the replica all-reduce."""
        inv, dims = self.inventory, self.dims
        blocks = list(inv.stage_blocks(stage, self.n_stages))
        units = [([p for p in params if p.block == b], b != blocks[-1]) for b in blocks]
        # apply_fsdp: every block but the last reshards after forward (the last is needed at once by
        # backward); the root never does.
        units.append(([p for p in params if p.block is None], False))
        for unit_params, may_reshard in units:
            numel = sum(inv.tp_local_numel(p, dims.tp, dims.dp_shard) for p in unit_params)
            reshards = self.reshard_after_forward and may_reshard
            if dims.pp > 1:
                # The pipeline schedule keeps parameters gathered from one backward to the next
                # (reshard_after_backward=False until the last), so a unit that reshards after
                # forward gathers before the first forward, then before each backward that follows
                # a forward: 1 + n_microbatches, in any schedule order.
                gathers = self.passes + 1 if reshards else 1
            else:
                gathers = self.passes * (2 if reshards else 1)  # lmforge reshards after every backward
            tally.add("dp_shard", "all_gather", numel * self.param_bytes, gathers)
            # Gradients are reduced on the last backward only (gradient_sync / the schedule).
            tally.add("dp_shard", "reduce_scatter", numel * self.grad_reduce_bytes)
            if dims.dp_replicate > 1:
                tally.add("dp_replicate", "all_reduce", numel // dims.dp_shard * self.grad_reduce_bytes)

    def _ddp(self, tally: _Tally, params: list[_Param]) -> None:
        """DDP: every gradient all-reduced once per step, in buckets; buffers broadcast once per step.

        DDP broadcasts the buffers (Llama's RoPE tables) from rank 0 in the first forward after a
        synchronised backward, i.e. once per step whatever the gradient accumulation.
        """
        sizes = [math.prod(p.shape) * MASTER_BYTES for p in params]
        tally.add_calls("dp_replicate", "all_reduce", sum(sizes), _ddp_buckets(sizes))
        # No buffer broadcast: apply_ddp sets broadcast_buffers=False (the RoPE tables are equal everywhere).

    def _tensor_parallel(self, tally: _Tally, stage: int) -> None:
        """Activations of one stage: per pass (micro-batch), forward and backward."""
        inv = self.inventory
        a, r = self.activation_bytes, self.residual_bytes
        stream = self.rows * self.seq_len * inv.dim  # one (B, T, dim) activation, full sequence
        positions = self.seq_len * inv.dim  # GPT-2's (T, dim) position embedding output
        padded_vocab = math.ceil(inv.vocab_size / self.dims.tp) * self.dims.tp
        logits = self.rows * self.seq_len * padded_vocab * a
        stage_blocks = inv.stage_blocks(stage, self.n_stages)
        n_blocks = len(stage_blocks)
        # Blocks whose forward backward runs again (activation checkpointing), with their collectives
        # but the last: torch's non-reentrant checkpoint stops recomputing once the last tensor the
        # block saved is rebuilt (the MLP's input to its rowwise linear), before its output reduction.
        n_recomputed = checkpointed_blocks(stage_blocks, self.activation_checkpointing)
        n_row, n_col = inv.tp_counts()
        first, last = stage == 0, stage == self.n_stages - 1
        has_positions = first and inv.plan.position_embedding is not None
        for _ in range(self.passes):
            if self.sequence_parallel:
                # Each sub-block: forward all-gather of its (residual-dtype) input and
                # reduce-scatter of its (compute-dtype) output; backward the transposes.
                for kind in ("all_gather", "reduce_scatter"):
                    tally.add("tp", kind, stream * r, n_blocks * n_row)
                    tally.add("tp", kind, stream * a, n_blocks * n_row)
                if n_recomputed:  # the forward's input gathers and output reductions, but the last
                    tally.add("tp", "all_gather", stream * r, n_recomputed * n_row)
                    tally.add("tp", "reduce_scatter", stream * a, n_recomputed * (n_row - 1))
                if first:  # rowwise embedding: reduce-scatter forward, all-gather of its gradient
                    tally.add("tp", "reduce_scatter", stream * r)
                    tally.add("tp", "all_gather", stream * r)
                if has_positions:
                    tally.add("tp", "reduce_scatter", positions * r)
                    tally.add("tp", "all_gather", positions * r)
                if last:  # the head gathers its input, then the logits; reduce-scatter of its input gradient
                    tally.add("tp", "all_gather", stream * r)
                    tally.add("tp", "reduce_scatter", stream * r)
            else:
                # Forward: one all-reduce per sub-block output; backward: one per colwise linear,
                # each of which takes the replicated input separately (DTensor.from_local).
                tally.add("tp", "all_reduce", stream * a, n_blocks * n_row + n_recomputed * (n_row - 1))
                tally.add("tp", "all_reduce", stream * r, n_blocks * n_col)
                if first:
                    tally.add("tp", "all_reduce", stream * r)
                if has_positions:
                    tally.add("tp", "all_reduce", positions * r)
                if last:
                    tally.add("tp", "all_reduce", stream * r)
            if last:
                tally.add("tp", "all_gather", logits)  # the head's output becomes the full logits

    def _pipeline(self, tally: _Tally, stage: int) -> None:
        """Sends of one stage per micro-batch: activations forward, their gradients backward."""
        # The whole (B, T, dim) residual stream: lmforge's pipeline refuses sequence parallelism.
        message = self.rows * self.seq_len * self.inventory.dim * self.residual_bytes
        sends = (stage != self.n_stages - 1) + (stage != 0)
        tally.add("pp", "p2p", message, sends * self.passes)

    def _gradient_norm(self, tally: _Tally, stages: list[int], rank_params: list[_Param]) -> None:
        """clip_grad_norm_ over DTensor gradients, and the sequence-parallel norm-weight gradients."""
        dims, inv = self.dims, self.inventory
        n_tensors = len(rank_params)
        holds_head_copy = dims.pp > 1 and inv.plan.tied and (self.n_stages - 1) in stages and 0 not in stages
        n_tensors -= holds_head_copy  # lmforge's pipeline clip counts a tied weight once, on the first stage
        # torch stacks the per-tensor norms and all-reduces them over each mesh dim they are Partial on.
        for dim, size in (("dp_shard", dims.dp_shard), ("tp", dims.tp)):
            if size > 1:
                tally.add(dim, "all_reduce", n_tensors * MASTER_BYTES)
        if dims.pp > 1:
            tally.add("pp", "all_reduce", MASTER_BYTES)  # the pipeline clip: norm**2 summed over stages
        if dims.tp > 1 and self.sequence_parallel:
            norm_params = [p for p in rank_params if p.is_norm]
            if dims.dp_shard > 1:
                # FSDP redistributes the Partial gradient once, in the dtype it holds it in: the
                # parameter dtype after one backward, the reduce dtype when it accumulated several.
                nbytes = self.grad_reduce_bytes if self.passes > 1 else self.param_bytes
                count = 1
            else:
                nbytes, count = MASTER_BYTES, SP_NORM_GRAD_REDUCTIONS_WITHOUT_FSDP
            for p in norm_params:
                tally.add("tp", "all_reduce", math.prod(p.shape) * nbytes, count)

    def _tied_embedding_sync(self, tally: _Tally, stages: list[int]) -> None:
        """sync_tied_embedding_grads: the first and last stages swap their copy's gradient shard."""
        inv, dims = self.inventory, self.dims
        if not inv.plan.tied or (0 in stages) == ((self.n_stages - 1) in stages):
            return
        embedding = next(p for p in inv.params if p.root_module == inv.plan.embedding)
        tally.add(
            "pp", "p2p", inv.tp_local_numel(embedding, dims.tp, dims.dp_shard) // dims.dp_shard * MASTER_BYTES
        )


def _ddp_buckets(sizes: list[int]) -> int:
    """How many all-reduces DDP issues: buckets filled in reverse parameter order (about the order
    gradients become ready), the first closing at 1 MiB, the others at 25 MiB."""
    n_buckets, filled, limit = 0, 0, DDP_FIRST_BUCKET_BYTES
    for size in reversed(sizes):
        filled += size
        if filled >= limit:
            n_buckets, filled, limit = n_buckets + 1, 0, DDP_BUCKET_BYTES
    return n_buckets + (filled > 0)

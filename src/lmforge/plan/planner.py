"""`lmforge plan`: which layout trains a model fastest on a cluster, and what it costs.

For a model (a flavor or any shape), a device from the catalogue (lmforge/hardware.yaml), a GPU
count, a sequence length and a global batch, each candidate layout (dp_replicate, dp_shard, tp, pp
with its schedule and micro-batches, activation checkpointing, bf16 or fp8 matmuls) gets:

memory per GPU  the rank's parameters, gradients and optimizer states and the activations its
                in-flight micro-batches keep (lmforge.plan.memory, exact against real tensors), the
                communication buffers (FSDP's gathered units, DDP's buckets), the transients (a
                recomputed block, the loss's logits), a fragmentation allowance and the CUDA context;
step time       compute (the model's FLOPs per token, the same function `lmforge bench` and the
                training logs use, plus what activation checkpointing recomputes) at an achievable
                fraction of the peak, the memory-bound elementwise traffic at the HBM bandwidth,
                each collective's wire bytes (lmforge.plan.comm, exact against real runs) at the
                link it crosses, counted where it is exposed, the pipeline bubble and the optimizer.

The free constants are below, in one place, with where each comes from; docs/plan.md compares the
predictions with published runs (one of them fitted, the others out of sample).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from lmforge.errors import ConfigError
from lmforge.hardware import Device
from lmforge.models import FamilyConfig, build_model, family_spec, model_config
from lmforge.parallel.mesh import ParallelDims
from lmforge.plan.comm import CommVolume, _Inventory, checkpointed_blocks, comm_per_step
from lmforge.plan.memory import (
    ActivationBytes,
    activation_bytes,
    loss_transient_bytes,
    rank_stages,
    state_bytes,
)

# ---------------------------------------------------------------------------------------------------
# The free constants (docs/plan.md, "The constants"). Only MATMUL_EFFICIENCY is fitted, on one
# published run (GPT-3 175B on 1,024 A100s, benchmarks/plan_validation.py --fit); the others are
# set from first principles or public microbenchmarks and never tuned against the published runs.
# ---------------------------------------------------------------------------------------------------

# Fraction of the dense peak that the model's matmuls and attention reach on average.
MATMUL_EFFICIENCY = 0.55
# Fraction of a link's bandwidth a large NCCL collective reaches (nccl-tests bus bandwidth on DGX
# A100/H100 nodes is about 75-85% of the per-direction NVLink and InfiniBand figures).
COMM_EFFICIENCY = 0.8
# Fixed cost of one collective call (launch and synchronisation), seconds.
COLLECTIVE_LATENCY_S = 20e-6
# Bytes of HBM traffic per byte saved for backward: written in forward, read in backward, and its
# gradient written and read once: the elementwise ops (norms, activations, RoPE, residual adds) are
# memory-bound, and in eager PyTorch each reads and writes its whole tensor.
ELEMENTWISE_TRAFFIC_PER_SAVED_BYTE = 4
# AdamW reads parameters, gradients and both moments and writes parameters and moments: 7 fp32
# accesses per element.
OPTIMIZER_ACCESSES = 7
# Memory the allocator cannot hand out (fragmentation, rounding of blocks), as a fraction of what
# the step allocates, and what the CUDA context, cuBLAS workspaces and NCCL take before it.
FRAGMENTATION = 0.05
CONTEXT_BYTES = 1.5 * 2**30

AC_CHOICES = ("none", "selective", "full")
PRECISIONS = ("bf16", "fp8")
SCHEDULES = ("1f1b", "gpipe", "interleaved_1f1b")


class PlanError(ConfigError, ValueError):
    """A request the planner cannot answer (bad layout, unknown model): one line for the user."""


@dataclass(frozen=True)
class Layout:
    dp_replicate: int
    dp_shard: int
    tp: int
    pp: int
    micro_batch: int = 1
    ac: str = "none"
    precision: str = "bf16"
    pp_schedule: str = "1f1b"

    @property
    def dims(self) -> ParallelDims:
        return ParallelDims(pp=self.pp, dp_replicate=self.dp_replicate, dp_shard=self.dp_shard, tp=self.tp)

    @property
    def n_gpus(self) -> int:
        return self.dims.world_size

    def describe(self, grad_accum: int | None = None) -> str:
        """dp{replicate}x{shard} tp pp [schedule] mb{sequences}[x{micro-batches per step}] ac precision."""
        parts = [f"dp{self.dp_replicate}x{self.dp_shard}", f"tp{self.tp}", f"pp{self.pp}"]
        if self.pp > 1:
            parts.append(
                {"1f1b": "1F1B", "gpipe": "GPipe", "interleaved_1f1b": "interleaved"}[self.pp_schedule]
            )
        micro_batches = f"mb{self.micro_batch}" + (f"x{grad_accum}" if grad_accum is not None else "")
        return " ".join([*parts, micro_batches, f"ac:{self.ac}", self.precision])


@dataclass(frozen=True)
class Job:
    """What is trained and on what: the model, the cluster, the batch and the token budget."""

    model: FamilyConfig
    device: Device
    n_gpus: int
    seq_len: int
    global_batch_tokens: int
    tokens: float | None = None  # the token budget, for days and cost
    price_per_gpu_hour: float | None = None

    @property
    def global_batch(self) -> int:
        return self.global_batch_tokens // self.seq_len


@dataclass
class Estimate:
    layout: Layout
    memory: dict[str, float]  # GiB per GPU, by part
    step: dict[str, float]  # seconds per step, by part ("comm DIM KIND": one collective's exposed time)
    grad_accum: int
    model_flops_per_token: int
    job: Job = field(repr=False)

    @property
    def memory_gib_per_gpu(self) -> float:
        return sum(self.memory.values())

    @property
    def fits(self) -> bool:
        return self.memory_gib_per_gpu <= self.job.device.memory_gib

    @property
    def step_time_s(self) -> float:
        return sum(self.step.values())

    @property
    def exposed_comm_s(self) -> float:
        return sum(t for part, t in self.step.items() if part.startswith("comm"))

    @property
    def tokens_per_sec(self) -> float:
        return self.job.global_batch * self.job.seq_len / self.step_time_s

    @property
    def tflops_per_gpu(self) -> float:
        """Model FLOPs (6N + attention, no recomputation) per second per GPU, in TFLOP/s."""
        return self.model_flops_per_token * self.tokens_per_sec / self.job.n_gpus / 1e12

    @property
    def mfu(self) -> float:
        return self.tflops_per_gpu * 1e12 / self.job.device.bf16_flops

    @property
    def days(self) -> float | None:
        return self.job.tokens / self.tokens_per_sec / 86400 if self.job.tokens else None

    @property
    def gpu_hours(self) -> float | None:
        return self.days * 24 * self.job.n_gpus if self.days is not None else None

    @property
    def cost(self) -> float | None:
        if self.gpu_hours is None or self.job.price_per_gpu_hour is None:
            return None
        return self.gpu_hours * self.job.price_per_gpu_hour

    def as_dict(self) -> dict:
        return {
            "layout": dataclasses.asdict(self.layout),
            "description": self.layout.describe(),
            "grad_accum": self.grad_accum,
            "memory_gib_per_gpu": round(self.memory_gib_per_gpu, 3),
            "memory_gib": {k: round(v, 3) for k, v in self.memory.items()},
            "fits": self.fits,
            "step_time_s": self.step_time_s,
            "step_s": self.step,
            "exposed_comm_s": self.exposed_comm_s,
            "tokens_per_sec": self.tokens_per_sec,
            "tflops_per_gpu": self.tflops_per_gpu,
            "mfu": self.mfu,
            "days": self.days,
            "gpu_hours": self.gpu_hours,
            "cost": self.cost,
        }


# ---------------------------------------------------------------------------------------------------
# One layout
# ---------------------------------------------------------------------------------------------------


def check_layout(job: Job, layout: Layout) -> int:
    """Refuse a layout lmforge cannot run for this job; returns the micro-batches per step per rank."""
    cfg, dims = job.model, layout.dims
    for name in ("dp_replicate", "dp_shard", "tp", "pp", "micro_batch"):
        if getattr(layout, name) < 1:
            raise PlanError(f"{name.replace('_', '-')} must be at least 1, got {getattr(layout, name)}")
    if layout.n_gpus != job.n_gpus:
        raise PlanError(
            f"layout {layout.describe()} uses {layout.n_gpus} GPUs (dp_replicate*dp_shard*tp*pp), not {job.n_gpus}"
        )
    if layout.ac not in AC_CHOICES:
        raise PlanError(f"activation checkpointing {layout.ac!r}: choose one of {', '.join(AC_CHOICES)}")
    if layout.precision not in PRECISIONS:
        raise PlanError(f"precision {layout.precision!r}: choose one of {', '.join(PRECISIONS)}")
    if layout.precision == "fp8" and job.device.fp8_flops is None:
        raise PlanError(f"{job.device.name} has no fp8 matmuls in the catalogue: use --precision bf16")
    if layout.pp_schedule not in SCHEDULES:
        raise PlanError(f"pipeline schedule {layout.pp_schedule!r}: choose one of {', '.join(SCHEDULES)}")
    if job.seq_len > cfg.max_seq_len:
        raise PlanError(f"--seq {job.seq_len} exceeds the model's max_seq_len {cfg.max_seq_len}")
    per_rank, rest = divmod(job.global_batch, dims.dp)
    if job.global_batch < 1 or rest:
        raise PlanError(
            f"the global batch of {job.global_batch} sequences ({job.global_batch_tokens} tokens / seq "
            f"{job.seq_len}) does not divide over {dims.dp} data-parallel ranks"
        )
    grad_accum, rest = divmod(per_rank, layout.micro_batch)
    if grad_accum < 1 or rest:
        raise PlanError(
            f"{per_rank} sequences per data-parallel rank do not divide into micro-batches of {layout.micro_batch}"
        )
    stages = layout.pp * (2 if layout.pp > 1 and layout.pp_schedule == "interleaved_1f1b" else 1)
    if layout.pp > 1 and cfg.n_layers % stages:
        # lmforge runs uneven stages; the planner's step time assumes even ones
        raise PlanError(
            f"layout {layout.describe()}: {cfg.n_layers} layers do not divide into {stages} pipeline stages "
            "(the planner models even stages)"
        )
    try:
        _comm(job, layout, grad_accum, None)
    except ValueError as err:
        raise PlanError(f"layout {layout.describe()}: {err}") from None
    return grad_accum


def _comm(job: Job, layout: Layout, grad_accum: int, pp_rank: int | None) -> CommVolume:
    dims = layout.dims
    return comm_per_step(
        job.model,
        dims,
        micro_batch_size=layout.micro_batch,
        seq_len=job.seq_len,
        grad_accum=grad_accum,
        param_bytes=2,  # FSDP's param_dtype bf16
        grad_reduce_bytes=4,
        activation_bytes=2,
        # With pipeline stages, FSDP keeps the stage gathered across micro-batches (as torchtitan
        # does), else it would gather it again for every one.
        reshard_after_forward=dims.pp == 1,
        sequence_parallel=dims.pp == 1,  # lmforge's pipeline refuses sequence parallelism
        pp_microbatches=grad_accum if dims.pp > 1 else None,
        pp_schedule=layout.pp_schedule,
        pp_rank=pp_rank,
        activation_checkpointing=layout.ac,
    )


def param_bytes(layout: Layout) -> int:
    """The parameters' dtype in the forward: FSDP2 gathers them in bf16 (its param_dtype); without
    FSDP, lmforge's mixed precision is bf16 autocast over fp32 parameters."""
    return 2 if layout.dp_shard > 1 else 4


def _link(job: Job, layout: Layout, dim: str) -> float:
    """Bandwidth of the slowest link a ring over mesh dimension `dim` crosses, in bytes/s.

    The mesh is (pp, dp_replicate, dp_shard, tp), tp innermost: a group of `size` ranks `stride`
    apart stays in a node when stride * size <= gpus_per_node."""
    dims, device = layout.dims, job.device
    stride = {"tp": 1, "dp_shard": dims.tp, "dp_replicate": dims.tp * dims.dp_shard,
              "pp": dims.tp * dims.dp_shard * dims.dp_replicate}[dim]  # fmt: skip
    size = {"tp": dims.tp, "dp_shard": dims.dp_shard, "dp_replicate": dims.dp_replicate, "pp": dims.pp}[dim]
    in_node = stride * size <= device.gpus_per_node  # else some hop crosses nodes and sets the pace
    return (device.intra_node_bandwidth if in_node else device.inter_node_bandwidth) * COMM_EFFICIENCY


def _block_forward_flops_per_token(cfg: FamilyConfig, seq_len: int) -> tuple[int, float]:
    """(matmul, attention) forward FLOPs per token of one block: 2 per weight, and a third of the
    attention term of the model's own flops_per_token (forward 1, backward 2) over its blocks."""
    key = (repr(cfg), seq_len)
    if key not in _BLOCK_FLOPS:
        inventory = _Inventory.of(cfg)
        block_params = sum(math.prod(p.shape) for p in inventory.params if p.block == 0)
        n_params = build_model(cfg, "meta").num_params(exclude_embeddings=True)
        attention = _flops_per_token(cfg, seq_len) - 6 * n_params
        _BLOCK_FLOPS[key] = (2 * block_params, attention / 3 / cfg.n_layers)
    return _BLOCK_FLOPS[key]


_BLOCK_FLOPS: dict[tuple[str, int], tuple[int, float]] = {}


def _stage_activations(
    job: Job, layout: Layout, pp_rank: int, n_stages: int, stages: list[int]
) -> list[ActivationBytes]:
    inventory = _Inventory.of(job.model)
    return [
        activation_bytes(
            job.model,
            layout.micro_batch,
            job.seq_len,
            compute_bytes=2,
            activation_checkpointing=layout.ac,
            blocks=inventory.stage_blocks(stage, n_stages),
            first=stage == 0,
            last=stage == n_stages - 1,
            tp=layout.tp,
            sequence_parallel=layout.pp == 1,
            param_bytes=param_bytes(layout),
        )
        for stage in stages
    ]


def _in_flight(layout: Layout, pp_rank: int, n_microbatches: int) -> int:
    """Micro-batches (stage passes) whose activations pipeline rank `pp_rank` holds at its peak."""
    if layout.pp == 1:
        return 1  # gradient accumulation frees each micro-batch's activations in its backward
    if layout.pp_schedule == "gpipe":
        return n_microbatches
    if layout.pp_schedule == "1f1b":
        return min(n_microbatches, layout.pp - pp_rank)
    # Interleaved 1F1B with 2 stages per rank (Megatron-LM's warm-up count): stage passes.
    return min(2 * n_microbatches, (layout.pp - pp_rank - 1) * 2 + layout.pp + 1)


def _memory(job: Job, layout: Layout, grad_accum: int, pp_rank: int) -> dict[str, float]:
    cfg, dims = job.model, layout.dims
    stages, n_stages = rank_stages(dims, pp_rank, layout.pp_schedule)
    state = state_bytes(cfg, dims, pp_rank, layout.pp_schedule)
    inventory = _Inventory.of(cfg)
    acts = _stage_activations(job, layout, pp_rank, n_stages, stages)
    n_microbatches = grad_accum
    passes = _in_flight(layout, pp_rank, n_microbatches)
    per_pass = sum(a.total for a in acts) / len(acts)  # interleaved: passes alternate the stages
    activations = per_pass * passes
    # Transients: one recomputed block while backward reruns it, and the loss's logits.
    recompute = max(a.per_block for a in acts) if layout.ac != "none" else 0
    last = (n_stages - 1) in stages
    fused = dims.tp == 1 and dims.pp == 1
    loss = loss_transient_bytes(cfg, layout.micro_batch, job.seq_len, 2, fused) if last else 0
    # Communication buffers: FSDP's gathered bf16 units (the one computing and the one prefetched)
    # and its unsharded fp32 gradients of one unit; under pp the whole stage stays gathered. DDP:
    # its fp32 gradient buckets, a copy of every gradient.
    stage_numel = sum(
        inventory.tp_local_numel(p, dims.tp) for s in stages for p in inventory.stage_params(s, n_stages)
    )
    block_numel = sum(inventory.tp_local_numel(p, dims.tp) for p in inventory.params if p.block == 0)
    if dims.dp_shard > 1:
        root_numel = stage_numel - block_numel * len(inventory.stage_blocks(stages[0], n_stages)) * len(
            stages
        )
        # the root unit stays gathered all step; with stages, the whole stage does
        gathered = stage_numel * 2 if dims.pp > 1 else (2 * block_numel + max(root_numel, 0)) * 2
        # Without gradient sync on the accumulation micro-batches, FSDP2 keeps every parameter's
        # unsharded fp32 gradient until the last one; else one unit's at a time.
        buffers = gathered + (stage_numel if grad_accum > 1 else block_numel) * 4
    elif dims.dp_replicate > 1:
        buffers = stage_numel * 4
    else:
        buffers = 0
    dynamic = state.total + activations + recompute + loss + buffers
    gib = 2**30
    return {
        "parameters": state.params / gib,
        "gradients": state.grads / gib,
        "optimizer": state.optimizer / gib,
        "activations": (activations + recompute + loss) / gib,
        "communication": buffers / gib,
        "fragmentation": dynamic * FRAGMENTATION / gib,
        "context": CONTEXT_BYTES / gib,
    }


def _step_time(job: Job, layout: Layout, grad_accum: int, flops_per_token: int) -> dict[str, float]:
    cfg, dims, device = job.model, layout.dims, job.device
    rank_tokens = job.global_batch * job.seq_len / dims.dp  # through every rank of a data-parallel group
    # Compute: the whole model's FLOPs per token (what bench and the logs count), split over tp
    # and pp, plus the forward of the recomputed blocks.
    matmul_fwd, attention_fwd = _block_forward_flops_per_token(cfg, job.seq_len)
    recomputed = checkpointed_blocks(range(cfg.n_layers), layout.ac)
    attention_flops = 3 * attention_fwd * cfg.n_layers + recomputed * attention_fwd
    matmul_flops = flops_per_token - 3 * attention_fwd * cfg.n_layers + recomputed * matmul_fwd
    per_gpu = rank_tokens / (dims.tp * dims.pp)  # each computes 1/(tp pp) of the model
    matmul_peak = device.fp8_flops if layout.precision == "fp8" and device.fp8_flops else device.bf16_flops
    compute = per_gpu * (matmul_flops / matmul_peak + attention_flops / device.bf16_flops) / MATMUL_EFFICIENCY
    # Elementwise traffic: every byte saved for backward is written, read and has its gradient
    # written and read (the recomputed blocks' bytes twice).
    acts = activation_bytes(cfg, 1, job.seq_len, 2, "none", tp=dims.tp, sequence_parallel=dims.pp == 1,
                            param_bytes=param_bytes(layout))  # fmt: skip
    saved_per_token = (acts.per_block * cfg.n_layers / dims.pp) / job.seq_len
    saved_per_token *= 1 + recomputed / cfg.n_layers
    memory = rank_tokens * saved_per_token * ELEMENTWISE_TRAFFIC_PER_SAVED_BYTE / device.memory_bandwidth
    busy = compute + memory
    # Pipeline bubble: (pp - 1) idle slots per m micro-batches; v stages per rank shrink a slot.
    v = 2 if layout.pp_schedule == "interleaved_1f1b" else 1
    bubble = busy * (dims.pp - 1) / (grad_accum * v) if dims.pp > 1 else 0.0
    # Communication of the busiest pipeline rank, by mesh dimension.
    volume = _comm(job, layout, grad_accum, None)
    # Seconds of each collective (mesh dim, kind) at the link its group crosses.
    seconds = {
        (dim, kind): sent / _link(job, layout, dim)
        for dim, kinds in volume.wire_bytes_by_dim().items()
        for kind, sent in kinds.items()
    }
    # TP and pipeline sends are on the critical path (lmforge overlaps neither). FSDP's gathers and
    # reduce-scatters and DDP's all-reduce overlap the compute: what does not fit under it is exposed,
    # plus the first gather and the last reduction, one unit's worth.
    n_units = cfg.n_layers // dims.pp + 1
    overlapped = sum(t for (dim, _), t in seconds.items() if dim.startswith("dp"))
    exposed_fraction = (
        (max(0.0, overlapped - busy) + overlapped / n_units) / overlapped if overlapped else 0.0
    )
    comm = {
        f"comm {dim} {kind}": t * (exposed_fraction if dim.startswith("dp") else 1.0)
        for (dim, kind), t in sorted(seconds.items())
    }
    # The optimizer step: memory-bound over the rank's shard.
    shard = state_bytes(cfg, dims, 0, layout.pp_schedule).params / 4
    optimizer = shard * OPTIMIZER_ACCESSES * 4 / device.memory_bandwidth
    return {
        "compute": compute,
        "elementwise": memory,
        "bubble": bubble,
        **comm,
        "comm latency": volume.n_calls * COLLECTIVE_LATENCY_S,
        "optimizer": optimizer,
    }


def estimate(job: Job, layout: Layout) -> Estimate:
    """Memory and time of one layout (PlanError if lmforge cannot run it for this job)."""
    grad_accum = check_layout(job, layout)
    flops_per_token = _flops_per_token(job.model, job.seq_len)
    memory = max(
        (_memory(job, layout, grad_accum, r) for r in range(layout.pp)), key=lambda m: sum(m.values())
    )
    step = _step_time(job, layout, grad_accum, flops_per_token)
    return Estimate(layout, memory, step, grad_accum, flops_per_token, job)


_FLOPS: dict[tuple[str, int], int] = {}


def _flops_per_token(cfg: FamilyConfig, seq_len: int) -> int:
    """The model's own flops_per_token (what bench and the training logs report), on a meta model."""
    key = (repr(cfg), seq_len)
    if key not in _FLOPS:
        _FLOPS[key] = build_model(cfg, "meta").flops_per_token(seq_len)
    return _FLOPS[key]


# ---------------------------------------------------------------------------------------------------
# The candidates
# ---------------------------------------------------------------------------------------------------


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidates(job: Job, precisions: tuple[str, ...] | None = None) -> list[Layout]:
    """Every layout worth ranking: tp within a node, pp dividing the layers, FSDP over the rest
    (or HSDP: sharded within a node, replicated across; or DDP alone), micro-batches 1-8, each
    activation checkpointing mode, bf16 and (where the device has it) fp8."""
    cfg, n, device = job.model, job.n_gpus, job.device
    if precisions is None:
        precisions = ("bf16", "fp8") if device.fp8_flops else ("bf16",)
    out = []
    for tp in (t for t in (1, 2, 4, 8) if t <= device.gpus_per_node and n % t == 0):
        for pp in (p for p in _divisors(cfg.n_layers) if p <= 64 and n % (tp * p) == 0):
            dp = n // (tp * pp)
            splits = {(1, dp)}
            in_node = max(1, device.gpus_per_node // tp)
            if dp > in_node and dp % in_node == 0:
                splits.add((dp // in_node, in_node))  # HSDP
            if dp > 1 and tp == 1 and pp == 1:
                splits.add((dp, 1))  # DDP
            schedules = ("1f1b", "interleaved_1f1b") if pp > 1 else ("1f1b",)
            for (replicate, shard), mb, ac, precision, schedule in (
                (s, m, a, p, sc)
                for s in sorted(splits)
                for m in (1, 2, 4, 8)
                for a in AC_CHOICES
                for p in precisions
                for sc in schedules
            ):
                out.append(Layout(replicate, shard, tp, pp, mb, ac, precision, schedule))
    return out


def plan(job: Job, layouts: list[Layout] | None = None, strict: bool = True) -> list[Estimate]:
    """Estimates of every valid candidate, fastest fitting first, then the rest. With `layouts`
    given, those (strict: a layout lmforge cannot run is an error, not skipped)."""
    estimates = []
    for layout in layouts if layouts is not None else candidates(job):
        try:
            estimates.append(estimate(job, layout))
        except PlanError:
            if layouts is not None and strict:
                raise
    return sorted(estimates, key=lambda e: (not e.fits, -e.tokens_per_sec))


def smallest_fitting_cluster(job: Job, limit: int = 2**17) -> int | None:
    """The fewest GPUs (one node times a power of two) on which some layout fits at the same
    global batch; None if none up to `limit`. Only the leanest layouts are tried (one sequence per
    micro-batch, full checkpointing, bf16): if none of those fits, no other does."""
    n = job.device.gpus_per_node
    while n <= limit:
        trial = dataclasses.replace(job, n_gpus=n)
        lean = [c for c in candidates(trial, ("bf16",)) if c.micro_batch == 1 and c.ac == "full"]
        if any(e.fits for e in plan(trial, lean, strict=False)):
            return n
        n *= 2
    return None


# ---------------------------------------------------------------------------------------------------
# Models from the command line
# ---------------------------------------------------------------------------------------------------


def parse_model(text: str) -> FamilyConfig:
    """`family:flavor`, `family:flavor,key=value,...` or `family:key=value,...` -> a model config.

    A custom shape takes the fields it does not name from the family's largest flavor (its vocab
    and context), with the derived ones (llama's ffn_hidden, n_kv_heads) derived again."""
    family, sep, rest = text.partition(":")
    if not sep or not rest.strip(","):
        raise PlanError(f"--model {text!r}: expected FAMILY:FLAVOR or FAMILY:key=value,... (e.g. llama:70b)")
    parts = [p for p in rest.split(",") if p]
    flavor = parts[0] if "=" not in parts[0] else None
    overrides: dict[str, object] = {}
    for part in parts[1:] if flavor else parts:
        key, eq, value = part.partition("=")
        if not eq:
            raise PlanError(f"--model {text!r}: {part!r} is not key=value")
        overrides[key] = _number(value)
    try:
        spec = family_spec(family)
        base = flavor if flavor is not None else list(spec.flavors)[-1]
        if base in spec.flavors:  # a field keeps its type: no qk_norm=maybe, no rope_theta=abc
            for field_name, given in overrides.items():
                current = getattr(spec.flavors[base], field_name, None)
                if isinstance(current, bool) and not isinstance(given, bool):
                    raise PlanError(f"--model {text!r}: {field_name} must be true or false, got {given!r}")
                if (
                    isinstance(current, (int, float))
                    and not isinstance(current, bool)
                    and isinstance(given, str)
                ):
                    raise PlanError(f"--model {text!r}: {field_name} must be a number, got {given!r}")
        if flavor is None:
            names = {f.name for f in dataclasses.fields(spec.config)}
            derived: dict[str, object] = {
                name: None for name in ("ffn_hidden", "n_kv_heads") if name in names
            }
            return model_config(family, base, **{**derived, **overrides})
        return model_config(family, flavor, **overrides)
    except (ValueError, TypeError) as err:
        raise PlanError(f"--model {text!r}: {err}") from None


def _number(value: str) -> object:
    for convert in (int, float):
        try:
            return convert(value)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(value.lower(), value)


def parse_count(text: str | int | float, what: str, binary: bool = False) -> float:
    """4M, 2T, 1.5B, 4096 -> a number. binary: k, M, G are powers of 2 (batch sizes: "4M tokens"
    is 4 x 2^20 = 1024 sequences of 4096)."""
    if isinstance(text, (int, float)):
        return float(text)
    scale = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}
    if binary:
        scale = {"k": 2.0**10, "m": 2.0**20, "g": 2.0**30, "b": 2.0**30}
    s = text.strip().lower()
    try:
        value = float(s[:-1]) * scale[s[-1]] if s and s[-1] in scale else float(s)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise PlanError(f"{what} {text!r} is not a positive number (e.g. 4M, 2T, 4194304)")
    return value

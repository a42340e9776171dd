"""Pipeline parallelism: the transformer's layers split into stages that run on different ranks.

Applied from outside the single-device model, the torchtitan way, with PyTorch's own
`torch.distributed.pipelining` (PipelineStage + ScheduleGPipe / Schedule1F1B /
ScheduleInterleaved1F1B). Each stage is a copy of the whole model with the layers it does not run
deleted and, except on the first stage, the embeddings set to None and, except on the last stage,
the final norm and output head set to None; the model's forward skips what is None (see the
models' forward docstrings). The blocks live in an nn.ModuleDict keyed "0".."n_layers-1", so a
parameter keeps its name on every stage (`layers.3.attention.wq.weight`) and a checkpoint does not
depend on the layout.

Order, on every rank of a pp group:
    1. build the full model with the same seed on every rank (build_model, or meta -> to_empty ->
       init_weights), so that every stage starts from the weights a single process would have;
    2. stages, stage_modules = build_pipeline_stages(model, mesh["pp"], stages_per_rank, device);
       then `del model`;
    3. apply TP / FSDP to each module in stage_modules, and build one optimizer over all of them;
    4. schedule = build_schedule(stages, n_microbatches, schedule_name, loss_fn).

One training step, on every rank of the pp group (inputs, targets: this step's (B, T) batch,
which every rank of the group loads; B divisible by n_microbatches):

    losses: list[Tensor] = []
    has_first, has_last = any(s.is_first for s in stages), any(s.is_last for s in stages)
    schedule.step(*([inputs] if has_first else []), target=targets if has_last else None,
                  losses=losses if has_last else None, return_outputs=False)
    sync_tied_embedding_grads(stage_modules, pp_mesh)        # no-op unless embeddings are tied
    grad_norm = clip_grad_norm_(stage_modules, max_norm, pp_mesh)
    optimizer.step(); optimizer.zero_grad(set_to_none=True)
    loss = pipeline_loss(stages, losses, pp_mesh)            # only on logging steps

The schedule averages the gradients over the microbatches (scale_grads=True), which matches a
loss_fn returning each microbatch's mean: the gradients are those of the whole batch's mean loss.
The step's loss is the mean of the microbatch losses that the last stage's rank collects in
`losses`; pipeline_loss all-reduces it over the pp group so that every rank can log it.

Stage ids are assigned "loop" style, as the interleaved schedule expects: with pp ranks and v
stages per rank, rank r holds stages r, r + pp, ..., r + (v - 1) * pp. So the first stage is on pp
rank 0 and the last on pp rank pp - 1.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B
from torch.distributed.tensor import DTensor

from lmforge.models import blocks, spec_of

SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b")


# ---------------------------------------------------------------------------------------------------
# Splitting the layers
# ---------------------------------------------------------------------------------------------------


def split_points(n_layers: int, n_stages: int) -> list[int]:
    """The n_stages - 1 layer indices at which stages 1, 2, ... begin (stage 0 begins at layer 0).

    Stage s runs layers [points[s - 1], points[s]) with points[-1] = 0 and points[n_stages - 1] =
    n_layers, i.e. range(([0] + points)[s], (points + [n_layers])[s]). Layers are shared out
    evenly; when they do not divide, the first stages get one more layer each, because the last
    stage also runs the output head and the loss, whose matmul over the vocabulary costs about as
    much as a block or more, while the first stage's embedding lookup costs almost nothing.
    E.g. split_points(10, 4) == [3, 6, 8]: stages of 3, 3, 2, 2 layers.
    """
    if n_stages < 1 or n_layers < n_stages:
        raise ValueError(f"cannot split {n_layers} layers into {n_stages} stages of at least one layer each")
    base, extra = divmod(n_layers, n_stages)
    points, start = [], 0
    for stage in range(n_stages - 1):
        start += base + (1 if stage < extra else 0)
        points.append(start)
    return points


def _stage_layer_range(n_layers: int, n_stages: int, stage_index: int) -> range:
    bounds = [0, *split_points(n_layers, n_stages), n_layers]
    return range(bounds[stage_index], bounds[stage_index + 1])


def validate_pp(
    n_layers: int,
    pp: int,
    stages_per_rank: int,
    batch_size: int,
    n_microbatches: int,
    schedule: str | None = None,
) -> None:
    """Raise ValueError naming the problem if this pipeline layout cannot run.

    batch_size is the batch one pipeline step receives (the per-data-parallel-rank batch).
    schedule (optional): also check what that schedule needs (the stages per rank it takes, and the
    microbatch counts the installed torch's schedules accept).
    """
    for name, value in (("pp", pp), ("stages_per_rank", stages_per_rank), ("n_microbatches", n_microbatches),
                        ("batch_size", batch_size)):  # fmt: skip
        if value < 1:
            raise ValueError(f"pipeline {name} must be >= 1, got {value}")
    n_stages = pp * stages_per_rank
    if n_stages > n_layers:
        raise ValueError(
            f"pp * stages_per_rank = {pp} * {stages_per_rank} = {n_stages} stages, but the model has only "
            f"{n_layers} layers: every stage needs at least one layer"
        )
    if batch_size % n_microbatches != 0:
        raise ValueError(
            f"batch size {batch_size} is not divisible by n_microbatches={n_microbatches}: the pipeline "
            "splits the batch into equal microbatches"
        )
    if schedule is None:
        return
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown pipeline schedule {schedule!r}; choose one of {list(SCHEDULES)}")
    if schedule == "interleaved_1f1b":
        if stages_per_rank < 2:
            raise ValueError(
                f"the interleaved_1f1b schedule needs stages_per_rank >= 2, got {stages_per_rank}; "
                "with one stage per rank use 1f1b"
            )
        # torch's ScheduleInterleaved1F1B runs the microbatches in rounds of about pp
        # (number of rounds = max(1, n_microbatches // pp)) and needs whole rounds.
        rounds = max(1, n_microbatches // pp)
        if n_microbatches % rounds != 0:
            raise ValueError(
                f"the interleaved_1f1b schedule needs n_microbatches to be a multiple of "
                f"max(1, n_microbatches // pp) = {rounds}, got n_microbatches={n_microbatches} with pp={pp}"
            )
    else:
        if stages_per_rank != 1:
            raise ValueError(
                f"the {schedule} schedule runs one stage per rank, got stages_per_rank={stages_per_rank}; "
                "use interleaved_1f1b for several"
            )
        if schedule == "1f1b" and n_microbatches < pp:
            # torch's Schedule1F1B refuses fewer microbatches than stages.
            raise ValueError(f"the 1f1b schedule needs n_microbatches >= pp, got {n_microbatches} < {pp}")


# ---------------------------------------------------------------------------------------------------
# Stages and schedule
# ---------------------------------------------------------------------------------------------------


def stage_module(model: nn.Module, stage_index: int, n_stages: int) -> nn.Module:
    """A copy of `model` that keeps only what stage `stage_index` of `n_stages` runs.

    Parameter names stay those of the full model. `model` is not changed. A tied embedding/head
    weight is copied once into the copy, so on a stage holding both it stays tied.
    """
    if not 0 <= stage_index < n_stages:
        raise ValueError(f"stage_index {stage_index} is not in [0, {n_stages})")
    spec = spec_of(model)
    layers = blocks(model)
    keep_layers = {str(i) for i in _stage_layer_range(len(layers), n_stages, stage_index)}
    dropped = [name for name in spec.stages.first if stage_index != 0]
    dropped += [name for name in spec.stages.last if stage_index != n_stages - 1]
    dropped_modules = [getattr(model, name) for name in dropped]
    dropped_modules += [layer for name, layer in layers.items() if name not in keep_layers]

    # Pre-seed deepcopy's memo with None for the tensors of the modules this stage drops, so that
    # they are not copied only to be deleted (a full copy per stage would need a whole model's
    # memory each). A tensor also used by a kept module (a tied weight) is copied.
    kept = {id(t) for name, t in _tensors(model) if not _is_under(name, dropped, spec.blocks, keep_layers)}
    memo: dict[int, object] = {}
    for module in dropped_modules:
        for _, t in _tensors(module):
            if id(t) not in kept:
                memo[id(t)] = None
    stage = copy.deepcopy(model, memo)

    stage_layers = blocks(stage)
    for name in list(stage_layers.keys()):
        if name not in keep_layers:
            del stage_layers[name]
    for name in dropped:
        setattr(stage, name, None)  # forward skips a None embedding / norm / head
    return stage


def _tensors(module: nn.Module) -> Iterable[tuple[str, Tensor]]:
    yield from module.named_parameters(remove_duplicate=False)
    yield from module.named_buffers(remove_duplicate=False)


def _is_under(name: str, dropped: list[str], layers: str, keep_layers: set[str]) -> bool:
    """Whether the tensor called `name` (in the full model) belongs to a module the stage drops."""
    parts = name.split(".")
    if parts[0] in dropped:
        return True
    return parts[0] == layers and parts[1] not in keep_layers


def build_pipeline_stages(
    model: nn.Module, pp_mesh: DeviceMesh, stages_per_rank: int, device: torch.device | str
) -> tuple[list[PipelineStage], list[nn.Module]]:
    """This rank's pipeline stages and their modules, pruned from copies of the full `model`.

    The rank with pp coordinate r gets stages r, r + pp, ... (pp * stages_per_rank stages in all),
    each a copy of `model` keeping its share of the layers (split_points), plus the embeddings on
    stage 0 and the final norm and head on the last stage. `model` itself is left as it is; the
    caller can delete it. A model that ties its embedding and head weights gets two copies of that
    weight, one on the first and one on the last stage (unless one stage holds both): call
    sync_tied_embedding_grads after each backward to keep them equal.
    Each stage's input and output shapes are inferred from the first microbatch at runtime.
    """
    pp_size, pp_rank = pp_mesh.size(), pp_mesh.get_local_rank()
    n_stages = pp_size * stages_per_rank
    n_layers = len(blocks(model))
    if stages_per_rank < 1 or n_stages > n_layers:
        raise ValueError(
            f"pp * stages_per_rank = {pp_size} * {stages_per_rank} stages do not fit {n_layers} layers: "
            "every stage needs at least one layer"
        )
    device = torch.device(device)
    stages, modules = [], []
    for stage_index in range(pp_rank, n_stages, pp_size):
        module = stage_module(model, stage_index, n_stages).to(device)
        stages.append(PipelineStage(module, stage_index, n_stages, device, group=pp_mesh.get_group()))
        modules.append(module)
    return stages, modules


def build_schedule(
    stages: list[PipelineStage],
    n_microbatches: int,
    schedule: str,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None,
) -> ScheduleGPipe | Schedule1F1B | ScheduleInterleaved1F1B:
    """The torch.distributed.pipelining schedule `schedule` ("gpipe", "1f1b", "interleaved_1f1b").

    loss_fn(logits (B, T, V), targets (B, T)) -> the microbatch's mean loss; None: forward only
    (schedule.eval). scale_grads=True divides the summed microbatch gradients by n_microbatches, so
    with a mean loss_fn the gradients are those of the whole batch's mean loss.
    """
    if schedule == "interleaved_1f1b":
        # list(): torch annotates list[_PipelineStageBase], which a list[PipelineStage] is not
        # (lists are invariant); a new list of the same stages is.
        return ScheduleInterleaved1F1B(list(stages), n_microbatches, loss_fn=loss_fn, scale_grads=True)
    if schedule in ("gpipe", "1f1b"):
        if len(stages) != 1:
            raise ValueError(f"the {schedule} schedule runs one stage per rank, got {len(stages)}")
        schedule_cls = ScheduleGPipe if schedule == "gpipe" else Schedule1F1B
        return schedule_cls(stages[0], n_microbatches, loss_fn=loss_fn, scale_grads=True)
    raise ValueError(f"unknown pipeline schedule {schedule!r}; choose one of {list(SCHEDULES)}")


# ---------------------------------------------------------------------------------------------------
# After the schedule's step: tied embeddings, the loss, gradient clipping
# ---------------------------------------------------------------------------------------------------

# Tied embeddings (GPT-2 always; Llama with tie_embeddings) are the one parameter used by two
# stages: the first stage's embedding and the last stage's head. We keep two copies, untied, and
# sum their gradients after every backward (as Megatron-LM does), rather than refusing pp > 1 for
# tied models, because GPT-2 has no untied variant and Llama-3.2-1B ties. The copies start equal
# (both pruned from one full model) and get the same summed gradient, which is exactly the tied
# weight's gradient; the same optimizer update then keeps them bit-for-bit equal. This needs the
# optimizer to treat both copies alike: the same lr and the same weight decay (an embedding is
# usually not decayed, so the head copy must not be either).


def _tied_pair(stage_modules: list[nn.Module]) -> tuple[nn.Parameter | None, nn.Parameter | None]:
    """(embedding weight, head weight) of the copies this rank holds; (None, None) if untied."""
    layout = spec_of(stage_modules[0]).stages
    if not layout.ties_embeddings(stage_modules[0].cfg):
        return None, None
    embedding = next((m.get_parameter(f"{layout.embedding}.weight") for m in stage_modules
                      if getattr(m, layout.embedding) is not None), None)  # fmt: skip
    head = next((m.get_parameter(f"{layout.head}.weight") for m in stage_modules
                 if getattr(m, layout.head) is not None), None)  # fmt: skip
    return embedding, head


def _local(grad: Tensor) -> Tensor:
    # Under FSDP a gradient is a DTensor sharded over the dp mesh; both copies have the same shape
    # and so the same sharding, and the sum is taken shard by shard.
    return grad.to_local() if isinstance(grad, DTensor) else grad


@torch.no_grad()
def sync_tied_embedding_grads(stage_modules: list[nn.Module], pp_mesh: DeviceMesh) -> None:
    """Give both copies of a tied embedding/head weight the sum of their gradients.

    Call on every rank after schedule.step() (and after any data-parallel gradient reduction)
    and before gradient clipping and optimizer.step(). A no-op for untied models, on ranks that
    hold neither copy, and where one stage holds both (then they are still one tied Parameter).
    """
    embedding, head = _tied_pair(stage_modules)
    if embedding is head:  # both None (untied, or a middle rank), or one stage holds both
        return
    if embedding is not None and head is not None:  # first and last stage on this rank (pp == 1)
        assert embedding.grad is not None and head.grad is not None  # called after backward
        total = _local(embedding.grad) + _local(head.grad)
        _local(embedding.grad).copy_(total)
        _local(head.grad).copy_(total)
        return
    # The first stage is on pp rank 0, the last on pp rank pp - 1: swap the gradients and add.
    group = pp_mesh.get_group()
    weight = embedding if embedding is not None else head
    # Not both None: that returned above (embedding is head). Called after backward: a gradient.
    assert weight is not None and weight.grad is not None
    mine = _local(weight.grad)
    peer = dist.get_global_rank(group, pp_mesh.size() - 1 if embedding is not None else 0)
    theirs = torch.empty_like(mine)
    ops = [dist.P2POp(dist.isend, mine, peer, group), dist.P2POp(dist.irecv, theirs, peer, group)]
    for work in dist.batch_isend_irecv(ops):
        work.wait()
    # The first stage computes e + h and the last h + e: the same bits, so the copies stay equal.
    mine.add_(theirs)


def pipeline_loss(stages: list[PipelineStage], losses: list[Tensor], pp_mesh: DeviceMesh) -> Tensor:
    """The step's loss on every pp rank: the mean of the microbatch losses of the last stage.

    `losses` is the list schedule.step(..., losses=losses) filled on the rank of the last stage
    (empty elsewhere). One scalar all-reduce over the pp group; no host sync (call .item() only on
    logging steps).
    """
    has_last = any(stage.is_last for stage in stages)
    device = stages[0].device
    loss = (
        torch.stack([x.detach().float() for x in losses]).mean()
        if has_last
        else torch.zeros((), device=device)
    )
    dist.all_reduce(loss, group=pp_mesh.get_group())  # sum: only the last stage's rank adds a non-zero
    return loss


@torch.no_grad()
def clip_grad_norm_(
    stage_modules: list[nn.Module], max_norm: float, pp_mesh: DeviceMesh, norm_type: float = 2.0
) -> Tensor:
    """Clip the gradients of all stages by their global norm over the pp group; returns that norm.

    Each rank only holds its stages' gradients, so the norm is combined across the pp group (and
    across the dp mesh, for FSDP's sharded DTensor gradients). A tied embedding/head weight counts
    once, as in the single-device model: call sync_tied_embedding_grads first.
    """
    params = list(dict.fromkeys(p for m in stage_modules for p in m.parameters() if p.grad is not None))
    embedding, head = _tied_pair(stage_modules)
    # The head's copy of a tied weight has the same (synced) gradient as the embedding's copy,
    # which is counted on the first stage.
    counted = [p for p in params if p is not head] if head is not embedding else params
    norm = torch.nn.utils.get_total_norm([p.grad for p in counted if p.grad is not None], norm_type)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    if math.isinf(norm_type):
        dist.all_reduce(norm, op=dist.ReduceOp.MAX, group=pp_mesh.get_group())
    else:
        norm = norm**norm_type
        dist.all_reduce(norm, group=pp_mesh.get_group())
        norm = norm ** (1.0 / norm_type)
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm

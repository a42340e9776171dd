"""Tensor parallelism (Megatron-LM), optionally with sequence parallelism, applied from outside.

Shoeybi et al. 2019, "Megatron-LM": in each block the first matmul of attention (q, k, v) and of the
MLP (up, gate) is split by output columns ("colwise") and the second (attention output, MLP down) by
input rows ("rowwise"). Each rank then computes whole heads and a slice of the MLP hidden units with
no communication in between, and one all-reduce per sub-block sums the rowwise partial outputs.
Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models" (sequence
parallelism): that all-reduce becomes a reduce-scatter over the sequence dimension, so the norms and
the residual stream between blocks hold only T / tp positions per rank, and an all-gather brings the
full sequence back before the next colwise matmul. Same communication volume, 1/tp of the
activation memory outside the matmuls.

Everything is expressed with PyTorch's DTensor tensor-parallel styles (`parallelize_module` with
`ColwiseParallel`, `RowwiseParallel`, `SequenceParallel`, `PrepareModuleInput`); the model files only
reshape attention with `-1` heads so that they run unchanged on a rank's local heads.

What each module gets, by the kind the family's plan gives it (lmforge.models.<family>.parallelize;
act = Shard(1), the sequence dim, with sequence parallelism, else Replicate()):

    embedding            RowwiseParallel: vocab rows sharded, output in `act`
    position_embedding   RowwiseParallel: positions sharded (GPT-2's wpe), output Shard(0) of (T, dim)
                         with SP (it lines up with the Shard(1) of (B, T, dim) token embeddings it
                         is added to), else Replicate
    norm                 SequenceParallel with SP, else replicated (ReplicateParallel)
    GatherInput          PrepareModuleInput on attention / MLP: all-gather `act` -> Replicate (SP only)
    colwise              ColwiseParallel: output heads / hidden units sharded (q, k, v; up, gate)
    rowwise              RowwiseParallel: output reduced (-scattered) into `act` (attention output, down)
    head                 ColwiseParallel, output Replicate: every rank gets the full logits as a
                         plain tensor
    anything else        untouched (Llama's RoPE tables: plain tensors, the same on every rank)

Every parameter becomes a DTensor on the TP mesh (sharded, or replicated for norms and rowwise
biases), so one optimizer, `clip_grad_norm_` and torch.distributed.checkpoint treat them alike.
Tied embeddings stay tied: the rowwise embedding and the colwise head both shard the (vocab, dim)
matrix as Shard(0), so after parallelizing the head is pointed at the embedding's DTensor again.

Order (see lmforge.parallel.apply): build the model with its weights materialised and identical on
every TP rank (same seed, or loaded), then `apply_tensor_parallel`, then FSDP / compile, then create
the optimizer. The sharded weights are scattered from TP rank 0; SequenceParallel takes the norm
weights from each rank as they are, hence "identical". This order is the one tested for exact parity
with a single device. For a model too large to materialise whole on a rank, build it on the meta
device, apply TP, then `model.to_empty(device=...)` and `model.init_weights()` (which re-ties the
head): that runs, but the random init is then drawn by DTensor's RNG, not as on a single device.
Inputs (token ids) must be identical on all ranks of a TP group, and with sequence parallelism T must
be divisible by tp (a forward pre-hook checks it).

Generation works on a sharded model: each rank's KV caches hold its own heads
(lmforge.models.kv_cache.local_heads; lmforge.parallel.inference loads a checkpoint so). Not
supported under TP: dropout > 0 gives masks that differ from a single-device run.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard, distribute_module
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from lmforge.models import FamilyConfig, FamilyModel, blocks, spec_of
from lmforge.models.spec import GatherInput, TensorParallelKind


def validate_tp(model_cfg: FamilyConfig, tp: int) -> None:
    """Raise ValueError, naming the config field, if `tp` cannot split the model evenly.

    The fields are the family's `tp_divisible` (lmforge.models.<family>.parallelize): heads must not
    be split across ranks, and the matmul widths must split evenly. The vocabulary may split
    unevenly (DTensor pads the last shard).
    """
    if not isinstance(tp, int) or tp < 1:
        raise ValueError(f"tp must be a positive int, got {tp!r}")
    for field in spec_of(model_cfg).tp_divisible:
        value = getattr(model_cfg, field)
        if value % tp != 0:
            raise ValueError(
                f"{type(model_cfg).__name__}.{field}={value} is not divisible by tp={tp}: "
                "tensor parallelism splits it evenly across the ranks"
            )


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh, sequence_parallel: bool = True) -> None:
    """Shard `model` (a model of any family, weights materialised) in place over the 1-D mesh `tp_mesh`.

    Afterwards every parameter is a DTensor (`param.full_tensor()` gathers one), `model(idx)` takes
    the full (B, T) token ids on every rank and returns the full logits (B, T, vocab) as a plain
    tensor, identical on every rank. Create the optimizer after this call.
    """
    if tp_mesh.ndim != 1:
        raise ValueError(f"apply_tensor_parallel needs a 1-D tensor-parallel mesh, got {tp_mesh.ndim} dims")
    tp = tp_mesh.size()
    if not isinstance(model, FamilyModel):  # any family's model or pipeline stage
        raise TypeError(f"tensor parallelism has no plan for {type(model).__name__}")
    spec = spec_of(model)
    validate_tp(model.cfg, tp)

    root_plan = _styles(spec.tp_plan.root, sequence_parallel)
    # Modules may be None on a pipeline stage that does not hold them.
    root_plan = {name: style for name, style in root_plan.items() if getattr(model, name, None) is not None}
    parallelize_module(model, tp_mesh, root_plan)
    layout = spec.stages
    _retie(model, layout.embedding, layout.head, tied=layout.ties_embeddings(model.cfg))

    for block in blocks(model).values():
        parallelize_module(block, tp_mesh, _styles(spec.tp_plan.block, sequence_parallel))
    if sequence_parallel:
        model.register_forward_pre_hook(_require_seq_len_divisible_by(tp))


class ReplicateParallel(ParallelStyle):
    """Replicate a module's parameters as DTensors; the module runs on full, replicated activations.

    For the norms without sequence parallelism: they would run correctly on plain parameters too,
    but a model with only DTensor parameters works with one foreach optimizer, clip_grad_norm_ and
    torch.distributed.checkpoint. The parameters are broadcast from rank 0 of the mesh.
    """

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        # torch annotates input_fn/output_fn as returning None, but uses what they return as the
        # module's new inputs/outputs (as its own parallel styles do).
        return distribute_module(
            module,
            device_mesh,
            input_fn=self._replicate_input,  # type: ignore[arg-type]  # see above
            output_fn=self._local_output,  # type: ignore[arg-type]  # see above
        )

    @staticmethod
    def _replicate_input(module: nn.Module, inputs: tuple[Any, ...], device_mesh: DeviceMesh) -> tuple:
        x, *rest = inputs
        if not isinstance(x, DTensor):
            x = DTensor.from_local(x, device_mesh, (Replicate(),), run_check=False)
        return (x.redistribute(placements=(Replicate(),)), *rest)

    @staticmethod
    def _local_output(module: nn.Module, output: DTensor, device_mesh: DeviceMesh) -> Tensor:
        return output.to_local()


def _styles(
    plan: Mapping[str, TensorParallelKind | GatherInput], sequence_parallel: bool
) -> dict[str, ParallelStyle]:
    """The DTensor style of each module a family's plan names, in the plan's order (new objects)."""
    styles = {name: _style(kind, sequence_parallel) for name, kind in plan.items()}
    return {name: style for name, style in styles.items() if style is not None}


def _style(kind: TensorParallelKind | GatherInput, sequence_parallel: bool) -> ParallelStyle | None:
    act: Placement = Shard(1) if sequence_parallel else Replicate()  # the residual stream's layout
    if isinstance(kind, GatherInput):
        return _gather_input(sequence_parallel, kind.n_other_inputs)
    if kind == "embedding":
        return RowwiseParallel(input_layouts=Replicate(), output_layouts=act)
    if kind == "position_embedding":
        # A position embedding's output (T, dim) is added to the (B, T, dim) token embeddings: with
        # SP it must hold the same sequence chunk, which is Shard(0) of (T, dim).
        return RowwiseParallel(
            input_layouts=Replicate(), output_layouts=Shard(0) if sequence_parallel else act
        )
    if kind == "norm":
        return SequenceParallel() if sequence_parallel else ReplicateParallel()
    if kind == "colwise":
        return ColwiseParallel()
    if kind == "rowwise":
        return RowwiseParallel(output_layouts=act)
    if kind == "head":
        return ColwiseParallel(input_layouts=act, output_layouts=Replicate(), use_local_output=True)
    raise ValueError(f"unknown tensor-parallel kind {kind!r}")


def _gather_input(sequence_parallel: bool, n_other_inputs: int) -> ParallelStyle | None:
    """With SP, all-gather a sub-block's first input (its sequence shard) into the full sequence.

    The other positional inputs (RoPE tables, input_pos) pass through untouched. Without SP the
    input is already replicated and the colwise layers take it as it is.
    """
    if not sequence_parallel:
        return None
    others = (None,) * n_other_inputs
    return PrepareModuleInput(input_layouts=(Shard(1), *others), desired_input_layouts=(Replicate(), *others))


def _retie(model: nn.Module, embedding_name: str, head_name: str, tied: bool) -> None:
    """Point the output head at the embedding's DTensor again.

    parallelize_module gives each module its own new Parameter, which unties a shared matrix. Both
    plans shard the (vocab, dim) matrix by vocab rows, Shard(0), so one DTensor serves both uses and
    its gradient sums both, as on a single device.
    """
    embedding, head = getattr(model, embedding_name, None), getattr(model, head_name, None)
    if not tied or embedding is None or head is None:
        return
    if head.weight.placements != embedding.weight.placements:  # a guard should the plans change
        raise RuntimeError(
            f"cannot keep {head_name}.weight tied to {embedding_name}.weight under tensor parallelism: "
            f"placements {head.weight.placements} != {embedding.weight.placements}"
        )
    head.weight = embedding.weight


def reduce_partial_grads(params) -> None:
    """Reduce every Partial gradient to Replicate, once, in place of the gradient.

    Under sequence parallelism without FSDP, a norm's weight is replicated but meets a sequence
    shard, so its gradient is Partial(sum). Left Partial, each use redistributes it again (the
    gradient norm once, foreach AdamW three times: 4 all-reduces a step on torch 2.13, 6 on 2.11),
    and torch 2.11's clip_grad_norm_ scales it wrongly: after 3 clipped AdamW steps the debug
    llama's norm weights were 2.3e-4 off one process's, against 6e-8 once reduced here first.
    Call after the last backward of a step, before clipping; a no-op for other gradients.
    """
    for param in params:
        grad = param.grad
        if isinstance(grad, DTensor) and any(placement.is_partial() for placement in grad.placements):
            placements = [Replicate() if pl.is_partial() else pl for pl in grad.placements]
            param.grad = grad.redistribute(placements=placements)


def _require_seq_len_divisible_by(tp: int):
    """A forward pre-hook: sequence parallelism splits T evenly across the tp ranks."""

    def check(module: nn.Module, args: tuple[Any, ...]) -> None:
        idx = args[0]
        if isinstance(idx, Tensor) and idx.dim() == 2 and idx.size(1) % tp != 0:
            raise ValueError(
                f"sequence parallelism needs the sequence length to be divisible by tp={tp}, "
                f"got {idx.size(1)}"
            )

    return check

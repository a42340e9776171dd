"""comm_per_step against the collectives a real CPU gloo run issues, plus hand-computed cases;
and, in the same runs, lmforge.plan.memory against each rank's own tensors: state_bytes against its
parameters, gradients and optimizer states, activation_bytes against what its forwards saved for
backward (SavedRecorder, the counting of tests/plan/test_memory.py on a rank of a layout).

The distributed test starts 2 (then 4) processes once, runs every layout below in them one after
the other (two untimed warm-up steps: FSDP's lazy init, DDP's bucket rebuild and the pipeline's
shape inference happen there), and records every collective of the third training step:
forward, loss, backward, clip_grad_norm_, AdamW step. A TorchDispatchMode sees each c10d op
(what dist.all_reduce, FSDP2, DDP's reducer and the pipeline's send/recv call) and each
functional collective (what DTensor's redistributions call) with its tensors and process group,
so the message sizes are read off the tensors themselves. The prediction must match exactly:
bytes and number of calls per (mesh dim, kind), on every rank.
"""

from __future__ import annotations

import contextlib
import json
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from gloo_worker import gloo_group
from torch.distributed._functional_collectives import AsyncCollectiveTensor
from torch.distributed.distributed_c10d import _resolve_process_group
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode

from lmforge.models import build_model, model_config
from lmforge.parallel.mesh import MESH_DIMS, ParallelDims
from lmforge.plan.comm import MASTER_BYTES, CommVolume, _Inventory, comm_per_step
from lmforge.plan.memory import StateBytes, activation_bytes, rank_stages, state_bytes

MICRO_BATCH, SEQ_LEN = 2, 16

# ---------------------------------------------------------------------------------------------------
# Recording the collectives a step issues
# ---------------------------------------------------------------------------------------------------


def _nbytes(x) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    return sum(_nbytes(t) for t in x)  # lists (of lists) of tensors


c10d, funcol = torch.ops.c10d, torch.ops._c10d_functional
# op -> (kind, args -> (message bytes, process group or group name)). The message: the full
# output of an all-gather, the full input of a reduce-scatter, the tensor of the others.
_RECORDED = {
    c10d._allgather_base_.default: ("all_gather", lambda a: (_nbytes(a[0]), a[2])),
    c10d.allgather_.default: ("all_gather", lambda a: (_nbytes(a[0]), a[2])),
    c10d.allgather_into_tensor_coalesced_.default: ("all_gather", lambda a: (_nbytes(a[0]), a[2])),
    c10d._reduce_scatter_base_.default: ("reduce_scatter", lambda a: (_nbytes(a[1]), a[2])),
    c10d.reduce_scatter_.default: ("reduce_scatter", lambda a: (_nbytes(a[1]), a[2])),
    c10d.reduce_scatter_tensor_coalesced_.default: ("reduce_scatter", lambda a: (_nbytes(a[1]), a[2])),
    c10d.allreduce_.default: ("all_reduce", lambda a: (_nbytes(a[0]), a[1])),
    c10d.allreduce_coalesced_.default: ("all_reduce", lambda a: (_nbytes(a[0]), a[1])),
    c10d.broadcast_.default: ("broadcast", lambda a: (_nbytes(a[0]), a[1])),
    c10d.send.default: ("p2p", lambda a: (_nbytes(a[0]), a[1])),
    c10d.recv_.default: ("p2p_recv", lambda a: (_nbytes(a[0]), a[1])),
    funcol.all_gather_into_tensor.default: ("all_gather", lambda a: (_nbytes(a[0]) * a[1], a[2])),
    funcol.all_gather_into_tensor_coalesced.default: ("all_gather", lambda a: (_nbytes(a[0]) * a[1], a[2])),
    funcol.reduce_scatter_tensor.default: ("reduce_scatter", lambda a: (_nbytes(a[0]), a[3])),
    funcol.reduce_scatter_tensor_coalesced.default: ("reduce_scatter", lambda a: (_nbytes(a[0]), a[3])),
    funcol.all_reduce.default: ("all_reduce", lambda a: (_nbytes(a[0]), a[2])),
    funcol.all_reduce_.default: ("all_reduce", lambda a: (_nbytes(a[0]), a[2])),
    funcol.all_reduce_coalesced.default: ("all_reduce", lambda a: (_nbytes(a[0]), a[2])),
    funcol.broadcast.default: ("broadcast", lambda a: (_nbytes(a[0]), a[2])),
    funcol.broadcast_.default: ("broadcast", lambda a: (_nbytes(a[0]), a[2])),
}
_NOT_COLLECTIVES = ("wait_tensor", "_wrap_tensor_autograd")


class CollectiveRecorder(TorchDispatchMode):
    """Records (kind, the group's ranks, message bytes) of every collective issued while active."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, tuple[int, ...], int]] = []
        self.unrecognised: list[str] = []  # any other c10d op: the test fails on it

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        # Let DTensor run first: it turns a redistribution into functional collectives on plain
        # tensors, which come back through this mode.
        if any(t is DTensor for t in types):
            return NotImplemented
        out = func(*args, **(kwargs or {}))
        if func in _RECORDED:
            kind, message = _RECORDED[func]
            nbytes, group = message(args)
            pg = _resolve_process_group(group) if isinstance(group, str) else dist.ProcessGroup.unbox(group)
            self.calls.append((kind, tuple(dist.get_process_group_ranks(pg)), nbytes))
        elif func.namespace in ("c10d", "_c10d_functional") and func._opname not in _NOT_COLLECTIVES:
            self.unrecognised.append(str(func))
        return out


class SavedRecorder:
    """Counts the bytes autograd saves for backward while active, as tests/plan/test_memory.py does,
    on a rank of a parallel layout: a DTensor's local shard; each storage once; not the parameters
    (sharded, or gathered by FSDP for the forward) nor the buffers. It keeps every saved tensor
    alive until it is done, so that a freed storage's address is never counted twice."""

    def __init__(self, parts) -> None:
        self.parts, self.bytes, self._seen, self._kept = parts, 0, set(), []

    def _not_activations(self) -> set[int]:
        locals_ = [t.to_local() if isinstance(t, DTensor) else t
                   for part in self.parts for t in (*part.parameters(), *part.buffers())]  # fmt: skip
        # FSDP2 frees a resharded parameter's storage (size 0, no data pointer)
        keys = set()
        for t in locals_:
            with contextlib.suppress(RuntimeError):
                keys.add(t.untyped_storage().data_ptr())
        return keys

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        local = t.to_local() if isinstance(t, DTensor) else t
        if isinstance(local, AsyncCollectiveTensor):  # a functional collective's output, not yet waited on
            local = local.elem
        key = local.untyped_storage().data_ptr()
        if key not in self._seen and key not in self._not_activations():
            self._seen.add(key)
            self._kept.append(local)
            self.bytes += local.untyped_storage().nbytes()
        return t

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        self._kept.clear()


# ---------------------------------------------------------------------------------------------------
# The layouts, run the way lmforge's pretrain runs them
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    dims: tuple[int, int, int, int]  # pp, dp_replicate, dp_shard, tp
    family: str = "llama"
    flavor: str = "debug"
    overrides: dict = field(default_factory=dict)
    bf16: bool = False  # autocast, and FSDP's param_dtype; parameters stay fp32
    grad_accum: int = 1
    sequence_parallel: bool = True
    reshard_after_forward: bool = True
    pp_schedule: str = "1f1b"
    pp_microbatches: int | None = None
    activation_checkpointing: str = "none"

    @property
    def parallel_dims(self) -> ParallelDims:
        return ParallelDims(*self.dims)

    def predicted(self, pp_rank: int) -> CommVolume:
        return comm_per_step(
            model_config(self.family, self.flavor, **self.overrides),
            self.parallel_dims,
            micro_batch_size=MICRO_BATCH,
            seq_len=SEQ_LEN,
            grad_accum=self.grad_accum,
            param_bytes=2 if self.bf16 else 4,
            grad_reduce_bytes=4,  # parallel.fsdp_reduce_dtype="fp32"
            activation_bytes=2 if self.bf16 else 4,
            reshard_after_forward=self.reshard_after_forward,
            sequence_parallel=self.sequence_parallel,
            pp_microbatches=self.pp_microbatches,
            pp_schedule=self.pp_schedule,
            pp_rank=pp_rank,
            activation_checkpointing=self.activation_checkpointing,
        )

    def predicted_saved(self, pp_rank: int) -> int:
        """Bytes saved for backward by all of the rank's forwards in one step (every micro-batch of
        every stage it holds): lmforge.plan.memory.activation_bytes, in the dtypes lmforge runs this
        layout in (bf16 parameters under FSDP, else bf16 autocast over fp32 ones)."""
        cfg = model_config(self.family, self.flavor, **self.overrides)
        dims = self.parallel_dims
        stages, n_stages = rank_stages(dims, pp_rank, self.pp_schedule)
        if dims.pp > 1:
            passes = self.pp_microbatches or dims.pp
            rows = MICRO_BATCH * self.grad_accum // passes
        else:
            passes, rows = self.grad_accum, MICRO_BATCH
        c, p = (2, 2 if dims.dp_shard > 1 else 4) if self.bf16 else (4, 4)
        inventory_blocks = _Inventory.of(cfg).stage_blocks
        return passes * sum(
            activation_bytes(
                cfg,
                rows,
                SEQ_LEN,
                c,
                self.activation_checkpointing,
                blocks=inventory_blocks(stage, n_stages),
                first=stage == 0,
                last=stage == n_stages - 1,
                tp=dims.tp,
                sequence_parallel=self.sequence_parallel,
                fused_loss=False,
                norm_stat_bytes=c,
                param_bytes=p,
            ).total  # fmt: skip
            for stage in stages
        )

    def predicted_state(self, pp_rank: int) -> StateBytes:
        cfg = model_config(self.family, self.flavor, **self.overrides)
        return state_bytes(cfg, self.parallel_dims, pp_rank, self.pp_schedule)


CASES_2 = {
    "fsdp": Case((1, 1, 2, 1)),
    "fsdp_bf16_accum2": Case((1, 1, 2, 1), bf16=True, grad_accum=2),
    "fsdp_keep_gathered": Case((1, 1, 2, 1), reshard_after_forward=False),
    "ddp_accum2": Case((1, 2, 1, 1), grad_accum=2),
    "ddp_tiny_two_buckets": Case(
        (1, 2, 1, 1), flavor="tiny"
    ),  # 35 MB of gradients: 1 MiB, then 25 MiB buckets
    "tp_sp": Case((1, 1, 1, 2)),
    "tp_no_sp": Case((1, 1, 1, 2), sequence_parallel=False),
    "tp_sp_autocast_bf16": Case((1, 1, 1, 2), bf16=True),  # fp32 residual stream, bf16 matmul outputs
    # recomputation repeats the checkpointed blocks' forward collectives
    "tp_sp_full_ac": Case((1, 1, 1, 2), activation_checkpointing="full"),
    "tp_no_sp_selective_ac": Case(
        (1, 1, 1, 2), overrides={"n_layers": 3}, sequence_parallel=False, activation_checkpointing="selective"
    ),
    "fsdp_full_ac_vocab_513": Case(
        (1, 1, 2, 1), overrides={"vocab_size": 513}, activation_checkpointing="full"
    ),
    "gpt2_tp_sp": Case((1, 1, 1, 2), family="gpt2"),
    "pp_1f1b": Case((2, 1, 1, 1), grad_accum=2, pp_microbatches=2),
    "pp_interleaved_tied": Case(
        (2, 1, 1, 1),
        overrides={"n_layers": 4, "tie_embeddings": True},
        grad_accum=2,
        pp_schedule="interleaved_1f1b",
        pp_microbatches=2,
    ),
}
CASES_4 = {
    "pp_tp_no_sp": Case((2, 1, 1, 2), sequence_parallel=False, grad_accum=2, pp_microbatches=2),
    "hsdp_accum2": Case((1, 2, 2, 1), grad_accum=2),
    "fsdp_tp_bf16": Case((1, 1, 2, 2), bf16=True),
    "fsdp_pp_interleaved_tied": Case(
        (2, 1, 2, 1),
        overrides={"n_layers": 4, "tie_embeddings": True},
        grad_accum=2,
        pp_schedule="interleaved_1f1b",
        pp_microbatches=2,
    ),
}


def _run_case(case: Case) -> dict:
    """Three optimizer steps through lmforge's own step (lmforge.train.step, as pretrain and bench
    take them), the third recorded."""
    from lmforge.config import OptimConfig, ParallelConfig, TrainConfig
    from lmforge.ops.cross_entropy import cross_entropy
    from lmforge.parallel.apply import layout_of
    from lmforge.parallel.mesh import build_mesh
    from lmforge.train.objective import next_token_loss
    from lmforge.train.step import build_train_step

    device, dims = torch.device("cpu"), case.parallel_dims
    parallel = ParallelConfig(dp_replicate=dims.dp_replicate, dp_shard=dims.dp_shard, tp=dims.tp, pp=dims.pp,
                              sequence_parallel=case.sequence_parallel, pp_schedule=case.pp_schedule,
                              pp_microbatches=case.pp_microbatches,
                              fsdp_reshard_after_forward=case.reshard_after_forward)  # fmt: skip
    mesh = build_mesh(dims, device)
    # A collective is attributed to a mesh dim by its group's ranks (DTensor and FSDP may hold
    # their own process group objects for the same ranks).
    dim_of_group = {
        tuple(dist.get_process_group_ranks(mesh[d].get_group())): d for d in MESH_DIMS if mesh[d].size() > 1
    }
    cfg = model_config(case.family, case.flavor, **case.overrides)
    torch.manual_seed(0)  # the same weights on every rank
    compute_dtype = torch.bfloat16 if case.bf16 else torch.float32
    train = TrainConfig(compile=False, activation_checkpointing=case.activation_checkpointing)
    step = build_train_step(cfg, train, parallel, OptimConfig(), layout_of(dims, mesh), device,
                            compute_dtype, pp_mesh=mesh["pp"] if dims.pp > 1 else None,
                            pipeline_loss=cross_entropy)  # fmt: skip
    loss_fn = next_token_loss(fused=False)

    # Every rank draws the same tokens: correct for TP and PP (one batch per group), and harmless
    # for data parallelism, whose communication does not depend on the values.
    generator = torch.Generator().manual_seed(1)
    recorder = CollectiveRecorder()
    for step_number in range(1, 4):
        batch = torch.randint(
            0, cfg.vocab_size, (MICRO_BATCH * case.grad_accum, SEQ_LEN + 1), generator=generator
        )
        # contiguous, as lmforge's loader makes them (a view would keep the whole (B, T + 1) rows)
        batches = [(rows[:, :-1].contiguous(), rows[:, 1:].contiguous()) for rows in batch.split(MICRO_BATCH)]
        saved = SavedRecorder(step.parts)
        with recorder if step_number == 3 else contextlib.nullcontext(), saved:
            step.forward_backward(batches, loss_fn, step_number)
            if step_number == 3:
                grads = _local_bytes(p.grad for part in step.parts for p in part.parameters())
            step.update(skip=False)
    optimizer_state = (v for opt in step.optimizers for state in opt.state.values() for v in state.values())
    by_dim: dict = defaultdict(lambda: defaultdict(int))
    calls: dict = defaultdict(lambda: defaultdict(int))
    for kind, group, nbytes in recorder.calls:
        dim = dim_of_group.get(group, f"group {group}")
        by_dim[dim][kind] += nbytes
        calls[dim][kind] += 1
    return {
        "pp_rank": mesh["pp"].get_local_rank(),
        "by_dim": {d: dict(k) for d, k in by_dim.items()},
        "calls": {d: dict(k) for d, k in calls.items()},
        "unrecognised": recorder.unrecognised,
        "saved_bytes": saved.bytes,
        "state": {
            "params": _local_bytes(p for part in step.parts for p in part.parameters()),
            "grads": grads,
            "optimizer": _local_bytes(optimizer_state),
        },
    }


def _local_bytes(tensors) -> int:
    """Bytes of the tensors this rank holds (a DTensor's local shard), each tensor once (FSDP2's
    gradient shards are views into one reduce-scatter buffer per unit: tensors, not storages)."""
    seen, total = set(), 0
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            continue
        local = t.to_local() if isinstance(t, DTensor) else t
        key = (local.data_ptr(), local.numel(), local.dtype)
        if key not in seen:
            seen.add(key)
            total += local.numel() * local.element_size()
    return total


def _worker(rank: int, world_size: int, rendezvous: str, cases: dict[str, Case], out_dir: str) -> None:
    with gloo_group(rank, world_size, rendezvous):
        results = {name: _run_case(case) for name, case in cases.items()}
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))


def _measure(cases: dict[str, Case], world_size: int, out_dir: Path) -> list[dict]:
    mp.spawn(_worker, args=(world_size, str(out_dir / "rendezvous"), cases, str(out_dir)), nprocs=world_size)
    return [json.loads((out_dir / f"rank{rank}.json").read_text()) for rank in range(world_size)]


@pytest.fixture(scope="module")
def measured_2(tmp_path_factory) -> list[dict]:
    return _measure(CASES_2, 2, tmp_path_factory.mktemp("comm2"))


@pytest.fixture(scope="module")
def measured_4(tmp_path_factory) -> list[dict]:
    return _measure(CASES_4, 4, tmp_path_factory.mktemp("comm4"))


def _check(case: Case, name: str, per_rank: list[dict]) -> None:
    for rank, results in enumerate(per_rank):
        got = results[name]
        assert got["unrecognised"] == [], f"rank {rank}: collectives the recorder does not know"
        sent_and_received = {
            d: {k: v for k, v in kinds.items() if k != "p2p_recv"} for d, kinds in got["by_dim"].items()
        }
        calls = {d: {k: v for k, v in kinds.items() if k != "p2p_recv"} for d, kinds in got["calls"].items()}
        want = case.predicted(got["pp_rank"])
        assert (sent_and_received, calls) == (want.by_dim, want.calls), (
            f"rank {rank} (pp rank {got['pp_rank']})"
        )
        if "pp" in got["by_dim"]:  # a rank receives what its neighbours send (here: as much as it sends)
            assert got["by_dim"]["pp"]["p2p_recv"] == got["by_dim"]["pp"]["p2p"]
        # What the rank's forwards saved for backward, all micro-batches together.
        assert got["saved_bytes"] == case.predicted_saved(got["pp_rank"]), f"rank {rank}: saved for backward"
    # Parameters, gradients and optimizer states: the prediction is the largest rank's (torch.chunk
    # gives the first ranks the larger shards), so it equals the maximum over the ranks of a stage.
    for pp_rank in {r[name]["pp_rank"] for r in per_rank}:
        stage_ranks = [r[name]["state"] for r in per_rank if r[name]["pp_rank"] == pp_rank]
        measured = {key: max(s[key] for s in stage_ranks) for key in ("params", "grads", "optimizer")}
        predicted = case.predicted_state(pp_rank)
        assert measured == {
            "params": predicted.params,
            "grads": predicted.grads,
            "optimizer": predicted.optimizer,
        }, f"pp rank {pp_rank}"


@pytest.mark.slow  # one spawn of 2 processes for all cases, ~15 s on 2 cores: -m "not slow" skips it
@pytest.mark.parametrize("name", list(CASES_2))
def test_prediction_matches_collectives_issued_2_ranks(name, measured_2):
    _check(CASES_2[name], name, measured_2)


@pytest.mark.slow  # one spawn of 4 processes, ~20 s on 2 cores
@pytest.mark.parametrize("name", list(CASES_4))
def test_prediction_matches_collectives_issued_4_ranks(name, measured_4):
    _check(CASES_4[name], name, measured_4)


# ---------------------------------------------------------------------------------------------------
# Hand-computed cases
# ---------------------------------------------------------------------------------------------------


def _debug_block_numel(cfg) -> int:
    kv = cfg.n_kv_heads * cfg.head_dim
    return 2 * cfg.dim + 2 * cfg.dim * cfg.dim + 2 * cfg.dim * kv + 3 * cfg.dim * cfg.ffn_hidden


def test_fsdp_by_hand():
    cfg = model_config("llama", "debug")  # 2 layers, dim 64, vocab 512, untied: no padding at dp_shard=2
    block, root = _debug_block_numel(cfg), 2 * cfg.vocab_size * cfg.dim + cfg.dim
    v = comm_per_step(cfg, ParallelDims(1, 1, 2, 1), 2, 16, param_bytes=2, grad_reduce_bytes=4)
    # forward: root, block 0, block 1; backward: block 0 (the root and the last block stay gathered)
    assert v.all_gather == (root + 3 * block) * 2
    assert v.calls["dp_shard"]["all_gather"] == 4
    assert v.reduce_scatter == (root + 2 * block) * 4
    assert v.all_reduce == 21 * MASTER_BYTES  # the stacked per-tensor gradient norms
    assert v.wire_bytes()["all_gather"] == v.all_gather // 2
    # Accumulation repeats the gathers, not the reductions.
    v4 = comm_per_step(cfg, ParallelDims(1, 1, 2, 1), 2, 16, grad_accum=4, param_bytes=2)
    assert (v4.all_gather, v4.reduce_scatter) == (4 * v.all_gather, v.reduce_scatter)


def test_fsdp_pads_dim0_to_the_shard_count():
    cfg = model_config("llama", "debug", vocab_size=513)  # embedding and head rows: 513 -> 516 at dp_shard=4
    v = comm_per_step(cfg, ParallelDims(1, 1, 4, 1), 1, 16, param_bytes=4, grad_reduce_bytes=4)
    root = 2 * 516 * cfg.dim + cfg.dim
    assert v.reduce_scatter == (root + 2 * _debug_block_numel(cfg)) * 4


def test_hsdp_all_reduces_the_shards_across_replicas():
    cfg = model_config("llama", "debug")
    fsdp = comm_per_step(cfg, ParallelDims(1, 1, 4, 1), 2, 16)
    hsdp = comm_per_step(cfg, ParallelDims(1, 2, 4, 1), 2, 16)
    assert hsdp.by_dim["dp_replicate"] == {"all_reduce": fsdp.reduce_scatter // 4}
    assert hsdp.by_dim["dp_shard"] == fsdp.by_dim["dp_shard"]
    # ring all-reduce: 2 (n - 1) / n of the message, n = 2 replicas, n = 4 shards
    replicas, shards = hsdp.by_dim["dp_replicate"]["all_reduce"], hsdp.by_dim["dp_shard"]["all_reduce"]
    assert hsdp.wire_bytes()["all_reduce"] == replicas + 2 * 3 * shards // 4


def test_ddp_by_hand():
    cfg = model_config("llama", "debug")
    n_params = build_model(cfg, "meta").num_params()
    v = comm_per_step(cfg, ParallelDims(1, 8, 1, 1), 4, 64, grad_accum=3)
    assert v.by_dim == {"dp_replicate": {"all_reduce": 4 * n_params}}  # no buffer broadcast
    assert v.calls["dp_replicate"] == {"all_reduce": 1}  # < 1 MiB: one bucket
    # 7b: 27 GB of fp32 gradients; every matrix (>= 128 MB) exceeds the 25 MiB bucket and goes alone,
    # the norm weights join the next matrix's bucket.
    big_model = build_model(model_config("llama", "7b"), "meta")
    big = comm_per_step(model_config("llama", "7b"), ParallelDims(1, 8, 1, 1), 1, 4096)
    assert big.all_reduce == 4 * big_model.num_params()
    n_matrices = sum(p.ndim == 2 for p in big_model.parameters())
    assert big.calls["dp_replicate"]["all_reduce"] in (n_matrices, n_matrices + 1)


def test_tensor_parallel_by_hand():
    cfg = model_config("llama", "debug")
    L, d, V, b, T = cfg.n_layers, cfg.dim, cfg.vocab_size, 2, 16
    stream = b * T * d
    sp = comm_per_step(cfg, ParallelDims(1, 1, 1, 2), b, T, activation_bytes=2, residual_bytes=2)
    # Per block 2 sub-blocks x (forward gather + backward gather); plus the embedding's gradient
    # and the head's input; plus the full logits.
    assert sp.all_gather == ((4 * L + 2) * stream + b * T * V) * 2
    assert sp.reduce_scatter == (4 * L + 2) * stream * 2
    no_sp = comm_per_step(cfg, ParallelDims(1, 1, 1, 2), b, T, activation_bytes=2, sequence_parallel=False)
    # forward: embedding + 2 per block; backward: 5 colwise inputs (wq, wk, wv, w1, w3) per block + head input
    assert no_sp.calls["tp"]["all_reduce"] == (1 + 2 * L) + (5 * L + 1) + 1  # + the gradient norms
    assert no_sp.all_gather == b * T * V * 2


def test_pipeline_by_hand():
    cfg = model_config("llama", "debug", n_layers=4)
    b, T, d = 8, 16, cfg.dim
    first = comm_per_step(
        cfg, ParallelDims(4, 1, 1, 1), b, T, activation_bytes=2, pp_microbatches=4, pp_rank=0
    )
    middle = comm_per_step(
        cfg, ParallelDims(4, 1, 1, 1), b, T, activation_bytes=2, pp_microbatches=4, pp_rank=1
    )
    # 4 micro-batches of 2 sequences, fp32 residual stream (no FSDP): forward activations only
    assert first.p2p == 4 * (2 * T * d * 4)
    assert middle.p2p == 2 * first.p2p  # activations forward and gradients backward
    busiest = comm_per_step(cfg, ParallelDims(4, 1, 1, 1), b, T, activation_bytes=2, pp_microbatches=4)
    assert busiest.pp_rank in (1, 2) and busiest.p2p == middle.p2p


@pytest.mark.parametrize("flavor", ["1b", "7b", "70b"])
def test_flavors_have_plausible_magnitudes(flavor):
    cfg = model_config("llama", flavor)
    n_params = build_model(cfg, "meta").num_params()
    fsdp = comm_per_step(cfg, ParallelDims(1, 1, 8, 1), 1, 4096)
    # bf16 parameters gathered twice (forward, backward), but the root (embeddings and head: 21%
    # of the 1b flavor) and the last block only once
    assert 0.75 * 2 * 2 * n_params < fsdp.all_gather <= 2 * 2 * n_params
    assert n_params * 4 <= fsdp.reduce_scatter < n_params * 4 * 1.001
    assert fsdp.wire_bytes()["all_gather"] == 7 * fsdp.all_gather // 8
    # TP shrinks FSDP's share by about tp, and adds activation traffic that does not depend on dp
    tp8 = comm_per_step(cfg, ParallelDims(1, 1, 8, 8), 1, 4096)
    assert tp8.by_dim["dp_shard"]["reduce_scatter"] == pytest.approx(fsdp.reduce_scatter / 8, rel=0.01)
    tp8_more_dp = comm_per_step(cfg, ParallelDims(1, 1, 64, 8), 1, 4096)
    assert tp8_more_dp.by_dim["tp"] == tp8.by_dim["tp"]
    assert tp8.by_dim["tp"]["all_gather"] > 4 * cfg.n_layers * 4096 * cfg.dim * 2


def test_result_is_a_plain_record():
    v = comm_per_step(model_config("llama", "debug"), ParallelDims(1, 1, 2, 2), 2, 16)
    assert v.total == sum(
        asdict(v)[k] for k in ("all_gather", "reduce_scatter", "all_reduce", "broadcast", "p2p")
    )
    assert set(v.by_dim) == {"dp_shard", "tp"}
    assert "dp_shard" in v.summary()


@pytest.mark.parametrize(
    ("dims", "kwargs", "message"),
    [
        (ParallelDims(1, 1, 1, 3), {}, "divisible by tp=3"),
        (ParallelDims(1, 2, 1, 2), {}, "HSDP"),
        (ParallelDims(1, 1, 1, 2), {"seq_len": 15}, "seq_len"),
        (ParallelDims(4, 1, 1, 1), {}, "stages"),  # debug has 2 layers
        (ParallelDims(2, 1, 1, 1), {"pp_microbatches": 3}, "divisible"),
        (ParallelDims(2, 2, 1, 1), {}, "DDP does not wrap stages"),
        (ParallelDims(2, 1, 1, 2), {}, "sequence_parallel=False"),
    ],
)
def test_rejects_layouts_lmforge_cannot_run(dims, kwargs, message):
    kwargs = {"micro_batch_size": 2, "seq_len": 16, **kwargs}
    with pytest.raises(ValueError, match=message):
        comm_per_step(model_config("llama", "debug"), dims, **kwargs)

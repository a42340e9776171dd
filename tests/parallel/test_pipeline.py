"""Pipeline parallelism: stage pruning, layout validation, and training parity on 2 CPU processes.

The parity tests train the debug models for 10 AdamW steps with pp=2 under every schedule and check
the per-step losses, gradient norms and final parameters against one process training the whole
model on the same global batches.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from gloo_worker import gloo_group
from torch.distributed.device_mesh import init_device_mesh

from lmforge.models import build_model, model_config
from lmforge.parallel.pipeline import (
    build_pipeline_stages,
    build_schedule,
    clip_grad_norm_,
    pipeline_loss,
    split_points,
    stage_module,
    sync_tied_embedding_grads,
    validate_pp,
)

PP = 2
N_STEPS = 10
BATCH, SEQ_LEN, N_MICROBATCHES = 8, 16, 4
# Microbatches and one full batch round differently in fp32 (~1e-7 relative). AdamW turns that into
# update differences up to about lr on the few elements whose gradient is ~0 by cancellation (the
# normalised update m / sqrt(v) of a pure-noise gradient is O(1)); lr 1e-3 keeps those under 1e-5
# over 10 steps (seen: <= 5e-6), while every parameter still moves by > 4e-3.
LR, WEIGHT_DECAY, MAX_NORM = 1e-3, 0.1, 1.0
CASES = [
    (family, schedule) for family in ("llama", "gpt2") for schedule in ("gpipe", "1f1b", "interleaved_1f1b")
]


def _config(family: str):
    return model_config(family, "debug", n_layers=4)  # 4 layers: 2 stages per rank x pp=2 for interleaved


def _loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def _batches(vocab_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    # Learnable sequences (arithmetic progressions mod vocab_size, random start and stride), so the
    # loss falls within the 10 steps.
    generator = torch.Generator().manual_seed(1234)
    start = torch.randint(0, vocab_size, (N_STEPS, BATCH, 1), generator=generator)
    stride = torch.randint(1, 4, (N_STEPS, BATCH, 1), generator=generator)
    tokens = (start + stride * torch.arange(SEQ_LEN + 1)) % vocab_size
    # Contiguous slices: torch 2.11's stages check their inputs' strides.
    return [(t[:, :-1].contiguous(), t[:, 1:].contiguous()) for t in tokens]


def _optimizer(params) -> torch.optim.Optimizer:
    # The same decay on every parameter: both copies of a tied weight must get the same update.
    return torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY)


# ---------------------------------------------------------------------------------------------------
# Single process
# ---------------------------------------------------------------------------------------------------


def test_split_points_share_layers_evenly() -> None:
    assert split_points(4, 2) == [2]
    assert split_points(4, 4) == [1, 2, 3]
    assert split_points(10, 4) == [3, 6, 8]  # 3, 3, 2, 2: the remainder goes to the first stages
    assert split_points(5, 1) == []
    with pytest.raises(ValueError, match="3 layers into 4 stages"):
        split_points(3, 4)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(n_layers=4, pp=4, stages_per_rank=2, batch_size=8, n_microbatches=4), "8 stages.*only 4 layers"),
        (dict(n_layers=4, pp=2, stages_per_rank=1, batch_size=6, n_microbatches=4), "batch size 6.*n_microbatches=4"),
        (dict(n_layers=4, pp=2, stages_per_rank=1, batch_size=8, n_microbatches=4, schedule="interleaved_1f1b"),
         "interleaved_1f1b schedule needs stages_per_rank >= 2"),
        (dict(n_layers=8, pp=2, stages_per_rank=2, batch_size=10, n_microbatches=5, schedule="interleaved_1f1b"),
         "multiple of max"),
        (dict(n_layers=8, pp=2, stages_per_rank=2, batch_size=8, n_microbatches=4, schedule="1f1b"),
         "1f1b schedule runs one stage per rank"),
        (dict(n_layers=8, pp=4, stages_per_rank=1, batch_size=8, n_microbatches=2, schedule="1f1b"),
         "n_microbatches >= pp"),
        (dict(n_layers=8, pp=2, stages_per_rank=1, batch_size=8, n_microbatches=4, schedule="zb"),
         "unknown pipeline schedule"),
        (dict(n_layers=8, pp=0, stages_per_rank=1, batch_size=8, n_microbatches=4), "pp must be >= 1"),
    ],
)  # fmt: skip
def test_validate_pp_names_the_problem(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        validate_pp(**kwargs)


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b", "interleaved_1f1b"])
def test_validate_pp_accepts_layouts_that_run(schedule: str) -> None:
    stages_per_rank = 2 if schedule == "interleaved_1f1b" else 1
    validate_pp(4, PP, stages_per_rank, BATCH, N_MICROBATCHES, schedule=schedule)  # the parity runs' layout
    validate_pp(8, 2, stages_per_rank, 6, 3, schedule=schedule)  # 3 microbatches: interleaved in 1 round


def test_build_schedule_rejects_unknown_name() -> None:
    with pytest.raises(ValueError, match="unknown pipeline schedule 'zb'"):
        build_schedule([], 4, "zb", _loss_fn)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_stages_chained_equal_the_full_model(family: str) -> None:
    torch.manual_seed(0)
    model = build_model(_config(family))
    stages = [stage_module(model, i, 4) for i in range(4)]
    names = [set(stage.state_dict()) for stage in stages]
    layers = "layers" if family == "llama" else "h"
    for i, stage_names in enumerate(names):  # stage i holds exactly layer i, under its global name
        assert {n.split(".")[1] for n in stage_names if n.startswith(layers + ".")} == {str(i)}
    assert set().union(*names) == set(model.state_dict())  # nothing lost, names unchanged
    for stage in stages:  # copies, not views of the full model
        for p in stage.parameters():
            assert all(p.data_ptr() != q.data_ptr() for q in model.parameters())

    idx = torch.randint(0, model.cfg.vocab_size, (2, 12))
    with torch.no_grad():
        h = idx
        for stage in stages:
            h = stage(h)
        torch.testing.assert_close(h, model(idx), rtol=0, atol=0)


def test_tied_weight_is_copied_to_first_and_last_stage_and_stays_tied_on_one_stage() -> None:
    torch.manual_seed(0)
    model = build_model(_config("gpt2"))
    first, last = stage_module(model, 0, 2), stage_module(model, 1, 2)
    assert first.lm_head is None and last.wte is None and last.wpe is None and first.ln_f is None
    assert last.lm_head.weight is not first.wte.weight
    assert torch.equal(last.lm_head.weight, model.wte.weight)
    whole = stage_module(model, 0, 1)
    assert whole.lm_head.weight is whole.wte.weight


# ---------------------------------------------------------------------------------------------------
# Two processes, pp=2: parity with one process
# ---------------------------------------------------------------------------------------------------


def _reference(family: str) -> dict:
    torch.manual_seed(0)
    model = build_model(_config(family))
    optimizer = _optimizer(model.parameters())
    losses, grad_norms = [], []
    for inputs, targets in _batches(model.cfg.vocab_size):
        loss = _loss_fn(model(inputs), targets)
        loss.backward()
        grad_norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM).item())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return {"losses": losses, "grad_norms": grad_norms, "state": model.state_dict()}


def _train_pipeline(family: str, schedule_name: str, pp_mesh) -> dict:
    torch.manual_seed(0)  # the same full model on every rank
    model = build_model(_config(family))
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    stages_per_rank = 2 if schedule_name == "interleaved_1f1b" else 1
    validate_pp(model.cfg.n_layers, PP, stages_per_rank, BATCH, N_MICROBATCHES, schedule=schedule_name)
    stages, modules = build_pipeline_stages(model, pp_mesh, stages_per_rank, torch.device("cpu"))
    del model
    schedule = build_schedule(stages, N_MICROBATCHES, schedule_name, _loss_fn)
    optimizer = _optimizer(list(dict.fromkeys(p for m in modules for p in m.parameters())))
    has_first, has_last = any(s.is_first for s in stages), any(s.is_last for s in stages)

    losses, grad_norms, microbatch_counts = [], [], []
    for inputs, targets in _batches(modules[0].cfg.vocab_size):
        microbatch_losses: list[torch.Tensor] = []
        schedule.step(
            *([inputs] if has_first else []),
            target=targets if has_last else None,
            losses=microbatch_losses if has_last else None,
            return_outputs=False,
        )
        sync_tied_embedding_grads(modules, pp_mesh)
        grad_norms.append(clip_grad_norm_(modules, MAX_NORM, pp_mesh).item())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(pipeline_loss(stages, microbatch_losses, pp_mesh).item())
        microbatch_counts.append(len(microbatch_losses))
    state = {k: v for m in modules for k, v in m.state_dict().items()}
    return {
        "losses": losses,
        "grad_norms": grad_norms,
        "microbatch_counts": microbatch_counts,
        "stage_ids": [s.stage_index for s in stages],
        "state": state,
        "initial": {k: initial[k] for k in state},
    }


def _worker(rank: int, rendezvous: str, out_dir: str) -> None:
    with gloo_group(rank, PP, rendezvous, timeout_s=120):
        pp_mesh = init_device_mesh("cpu", (PP,), mesh_dim_names=("pp",))["pp"]
        for family, schedule_name in CASES:
            result = _train_pipeline(family, schedule_name, pp_mesh)
            torch.save(result, Path(out_dir) / f"{family}_{schedule_name}_rank{rank}.pt")


@pytest.fixture(scope="module")
def pipeline_runs(tmp_path_factory) -> Path:
    """Every case trained once by 2 spawned processes; results saved per case and rank."""
    out_dir = tmp_path_factory.mktemp("pipeline")
    mp.spawn(_worker, args=(str(out_dir / "rendezvous"), str(out_dir)), nprocs=PP, join=True)
    return out_dir


@pytest.mark.parametrize(("family", "schedule_name"), CASES)
def test_pipeline_training_matches_single_process(
    pipeline_runs: Path, family: str, schedule_name: str
) -> None:
    reference = _reference(family)
    ranks = [torch.load(pipeline_runs / f"{family}_{schedule_name}_rank{r}.pt") for r in range(PP)]

    expected_ids = [[0, 2], [1, 3]] if schedule_name == "interleaved_1f1b" else [[0], [1]]
    assert [r["stage_ids"] for r in ranks] == expected_ids
    assert ranks[-1]["microbatch_counts"] == [N_MICROBATCHES] * N_STEPS  # the last stage's losses

    for r in ranks:  # every rank logs the same loss, equal to one process's full-batch loss
        torch.testing.assert_close(
            torch.tensor(r["losses"]), torch.tensor(reference["losses"]), rtol=1e-5, atol=0
        )
        torch.testing.assert_close(
            torch.tensor(r["grad_norms"]), torch.tensor(reference["grad_norms"]), rtol=1e-5, atol=0
        )
    assert max(reference["grad_norms"]) > MAX_NORM  # clipping was active, so the global norm mattered
    assert reference["losses"][-1] < reference["losses"][0] - 0.05  # it trained

    # The stages' parameters, by name, are the reference's after 10 steps; together they are all of them.
    names = [set(r["state"]) for r in ranks]
    assert names[0] | names[1] == set(reference["state"])
    for r in ranks:
        for name, value in r["state"].items():
            torch.testing.assert_close(value, reference["state"][name], rtol=0, atol=1e-5, msg=name)
            if value.is_floating_point():
                assert not torch.allclose(value, r["initial"][name], atol=1e-4), f"{name} did not train"

"""lmforge.train.checkpoint and lmforge.train.resume in-process: what a save writes, what a load restores,
a failed save, a re-save, pruning, the recovery of an interrupted re-save, the trainer state's checks,
and which checkpoint a run starts from.

tests/reliability runs the same code inside real training runs that are killed, stopped and resumed
under torchrun; these call it in the test process, where mutation testing (`make mutate`) sees it.
The tests that take `process_group` run both without a process group and in a gloo group of one
process, which takes the distributed code path (DCP's distributed writer, the gathered error, the
barriers); the deaths mid-save happen in a forked copy of the test process.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import pickle
import signal
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException, _wrap_exception

from lmforge import faults
from lmforge.config import config_sha256
from lmforge.errors import CheckpointError, ConfigError
from lmforge.faults import ENV
from lmforge.models import build_model
from lmforge.parallel.pipeline import stage_module
from lmforge.rundir import (
    FORMAT_VERSION,
    TRAINER_STATE,
    checkpoint_name,
    list_checkpoints,
    model_state_dict,
    run_model_config,
    sha256_file,
    verify_checkpoint,
)
from lmforge.train import checkpoint as ckpt
from lmforge.train.checkpoint import (
    _from_json,
    _optimizer_state,
    load_checkpoint,
    load_trainer_state,
    recover_interrupted_save,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from lmforge.train.optim import build_optimizer
from lmforge.train.resume import JOB_MARKER, mark_job, restart_count, start_checkpoint

TRAINER = {"loader": {"samples_seen": 24, "seed": 0}, "guard": {"nonfinite_steps": 1, "lr_scale": 0.5}}


@pytest.fixture(params=["single", "group of 1"])
def process_group(request):
    """No process group, or a real gloo group of this one process."""
    if request.param == "single":
        yield False
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield True
    finally:
        dist.destroy_process_group()


class Run:
    """A debug model of a family with its AdamW after ``steps`` updates, and what a save needs."""

    def __init__(
        self, make_config, family: str, root: Path, steps: int = 2, seed: int = 0, optim: str = "adamw"
    ):
        flavor = {"family": family, "flavor": "debug"}
        self.cfg = make_config(model=flavor, optim={"name": optim})
        self.tokenizer = Path(self.cfg.data.dir) / "tokenizer.json"
        self.root = root
        torch.manual_seed(seed)
        self.model = build_model(run_model_config(self.cfg.model, self.cfg.data.seq_len, 512), "cpu")
        self.optimizer = build_optimizer(self.model, self.cfg.optim, "cpu")
        for _ in range(steps):
            for p in self.model.parameters():
                p.grad = torch.randn_like(p)
            self.optimizer.step()

    def save(self, step: int, keep_last: int = 3, trainer: dict | None = None) -> Path:
        return save_checkpoint(self.root, step, self.model, self.optimizer, trainer or TRAINER, self.cfg,
                               self.tokenizer, keep_last)  # fmt: skip


def same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def optimizer_tensors(run: Run) -> dict[str, torch.Tensor]:
    state = run.optimizer.state_dict()["state"]
    return {f"{i}.{k}": v for i, s in state.items() for k, v in s.items()}


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # gpt2: tied embeddings, saved under one name
def test_a_save_then_a_load_restores_model_optimizer_and_rng(debug_config, tmp_path, process_group, family):
    saved = Run(debug_config, family, tmp_path / "run")
    torch.manual_seed(7)
    final = saved.save(5)
    after_save = torch.rand(4)  # what the training would draw next

    assert final == tmp_path / "run" / "checkpoints" / checkpoint_name(5)
    assert sorted(p.name for p in (final.parent).iterdir()) == [final.name]  # no temporary left
    manifest = verify_checkpoint(final)  # every file listed with its size and sha256
    assert manifest["format"] == FORMAT_VERSION and manifest["step"] == 5
    assert manifest["config_sha256"] == config_sha256(saved.cfg)
    assert not (final / "model" / "sharded").exists() and not (final / "optimizer" / "sharded").exists()
    assert (final / "tokenizer.json").read_bytes() == saved.tokenizer.read_bytes()
    state = json.loads((final / TRAINER_STATE).read_text())
    assert {k: state[k] for k in TRAINER} == TRAINER and state["step"] == 5
    scalars = state["optimizer"]["scalars"]
    assert scalars and all(v == {"tensor": 2.0, "dtype": "float32"} for v in scalars.values())  # Adam's step

    loaded = Run(debug_config, family, tmp_path / "other", steps=1, seed=3)  # other weights, moments, steps
    torch.manual_seed(99)
    got = load_checkpoint(final, loaded.model, loaded.optimizer)
    assert got == state
    assert torch.equal(torch.rand(4), after_save)  # the RNG continues where the saved run's was
    assert same_tensors(model_state_dict(loaded.model), model_state_dict(saved.model))
    assert same_tensors(optimizer_tensors(loaded), optimizer_tensors(saved))
    if family == "gpt2":
        assert loaded.model.lm_head.weight is loaded.model.wte.weight  # still tied after the load
    # The loaded optimizer steps as the saved one does.
    for run in (saved, loaded):
        torch.manual_seed(1)
        for p in run.model.parameters():
            p.grad = torch.randn_like(p)
        run.optimizer.step()
    assert same_tensors(model_state_dict(loaded.model), model_state_dict(saved.model))


def test_every_file_and_directory_is_synced_before_the_rename(debug_config, tmp_path, monkeypatch):
    run = Run(debug_config, "llama", tmp_path / "run")
    synced: list[Path] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    if not Path("/proc/self/fd").is_dir():
        pytest.skip("reads /proc/self/fd (Linux)")
    monkeypatch.setattr(os, "fsync", fsync)
    final = run.save(3)
    tmp = final.parent / f".{final.name}.tmp"
    written = [p for p in sorted(final.rglob("*"))] + [final]
    expected = {tmp / p.relative_to(final) if p != final else tmp for p in written}
    assert expected <= set(synced[:-1]), sorted(expected - set(synced))
    assert synced[-1] == final.parent  # the rename itself, last


def test_a_failed_save_leaves_nothing_and_names_the_newest_checkpoint(debug_config, tmp_path, process_group,
                                                                      monkeypatch):  # fmt: skip
    run = Run(debug_config, "llama", tmp_path / "run")
    monkeypatch.setenv(ENV, "checkpoint.before_manifest:enospc@step=2-3")
    monkeypatch.setattr(faults, "_parsed", ("", []))  # a fault fires once per step and process: reset
    prefix = "rank 0: " if process_group else ""
    injected = f"{prefix}OSError: [Errno 28] No space left on device (injected by {ENV} at checkpoint.before_manifest)"
    with pytest.raises(CheckpointError) as err:
        run.save(2)
    final = tmp_path / "run" / "checkpoints" / checkpoint_name(2)
    assert str(err.value) == f"cannot write checkpoint {final} ({injected}); no earlier checkpoint exists"
    assert err.value.__cause__ is None and err.value.__suppress_context__
    assert list((tmp_path / "run" / "checkpoints").iterdir()) == []

    first = run.save(1)
    with pytest.raises(CheckpointError) as err:
        run.save(3)
    final = final.parent / checkpoint_name(3)
    assert (
        str(err.value)
        == f"cannot write checkpoint {final} ({injected}); the newest checkpoint is still {first.name}"
    )
    assert list((tmp_path / "run" / "checkpoints").iterdir()) == [first]
    verify_checkpoint(first)


def test_a_failure_inside_dcp_is_one_line(debug_config, tmp_path, monkeypatch):
    """DCP gathers every rank's exception, tracebacks included, into one CheckpointException."""
    run = Run(debug_config, "llama", tmp_path / "run")

    def failing_save(*args, **kwargs):
        try:
            raise OSError("disk quota exceeded " + "x" * 600)
        except OSError as err:
            raise CheckpointException("save", {0: _wrap_exception(err)}) from None

    monkeypatch.setattr(ckpt.dcp, "save", failing_save)
    with pytest.raises(CheckpointError) as err:
        run.save(4)
    final = tmp_path / "run" / "checkpoints" / checkpoint_name(4)
    reason = (
        str(err.value)
        .removeprefix(f"cannot write checkpoint {final} (")
        .removesuffix("); no earlier checkpoint exists")
    )
    assert reason.startswith(
        "CheckpointException ranks:dict_keys([0]) Traceback (most recent call last): (RANK 0) "
    )
    assert "OSError: disk quota exceeded xxx" in reason and len(reason) == 500 and "\n" not in reason
    assert list(final.parent.iterdir()) == []


def test_saving_a_step_again_replaces_it_and_pruning_keeps_the_newest(debug_config, tmp_path, process_group):
    run = Run(debug_config, "llama", tmp_path / "run")
    for step in (1, 2, 3):
        run.save(step, keep_last=2)
    root = tmp_path / "run" / "checkpoints"
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == [checkpoint_name(2), checkpoint_name(3)]
    incomplete = root / checkpoint_name(0)  # no manifest: not a checkpoint, not counted, not pruned
    incomplete.mkdir()
    run.save(4, keep_last=1)
    assert sorted(p.name for p in root.iterdir()) == [checkpoint_name(0), checkpoint_name(4)]

    before = sha256_file(root / checkpoint_name(4) / "model" / "model-00001-of-00001.safetensors")
    for p in run.model.parameters():
        p.data.add_(1.0)
    again = run.save(4, keep_last=1, trainer={**TRAINER, "loader": {"samples_seen": 99, "seed": 0}})
    assert sorted(p.name for p in root.iterdir()) == [checkpoint_name(0), checkpoint_name(4)]
    verify_checkpoint(again)
    assert sha256_file(again / "model" / "model-00001-of-00001.safetensors") != before
    assert load_trainer_state(again)["loader"]["samples_seen"] == 99


def test_a_save_that_cannot_make_its_directory_is_one_error(debug_config, tmp_path):
    run = Run(debug_config, "llama", tmp_path / "run")
    run.root.write_text("a file where the run directory should be")
    with pytest.raises(CheckpointError) as err:
        run.save(1)
    final = run.root / "checkpoints" / checkpoint_name(1)
    assert str(err.value).startswith(f"cannot write checkpoint {final} (NotADirectoryError: ")
    assert str(err.value).endswith("); no earlier checkpoint exists")


def test_pipeline_stages_save_and_load_as_lists(debug_config, tmp_path):
    """A rank's pipeline stages come as lists of parts and optimizers (one each), of equal length."""
    saved = Run(debug_config, "llama", tmp_path / "run")
    final = save_checkpoint(
        saved.root, 1, [saved.model], [saved.optimizer], TRAINER, saved.cfg, saved.tokenizer, 1
    )
    loaded = Run(debug_config, "llama", tmp_path / "other", steps=1, seed=3)
    load_checkpoint(final, [loaded.model], [loaded.optimizer])
    assert same_tensors(optimizer_tensors(loaded), optimizer_tensors(saved))
    with pytest.raises(ValueError):  # a part without its optimizer is a bug, not a shorter save
        save_checkpoint(saved.root, 2, [saved.model, loaded.model], [saved.optimizer], TRAINER, saved.cfg,
                        saved.tokenizer, 1)  # fmt: skip
    with pytest.raises(ValueError):
        load_checkpoint(final, [loaded.model, saved.model], [loaded.optimizer])


def died_saving(run: Run, step: int, fault_spec: str, monkeypatch, keep_last: int = 3) -> None:
    """Save ``step`` in a forked copy of this process that the fault kills (SIGKILL) at its point."""
    monkeypatch.setenv(ENV, fault_spec)
    monkeypatch.setattr(faults, "_parsed", ("", []))
    child = multiprocessing.get_context("fork").Process(target=run.save, args=(step, keep_last))
    child.start()
    child.join(120)
    assert child.exitcode == -signal.SIGKILL, child.exitcode
    monkeypatch.delenv(ENV)


@pytest.mark.skipif(sys.platform != "linux", reason="forks the test process")
@pytest.mark.parametrize(
    "point", ["mid_shard", "before_manifest", "before_rename", "during_rename", "after_rename"]
)
def test_a_death_anywhere_in_a_save_leaves_a_valid_newest_checkpoint(
    debug_config, tmp_path, monkeypatch, point
):
    run = Run(debug_config, "llama", tmp_path / "run")
    root = run.root / "checkpoints"
    first = run.save(1)
    step = 1 if point == "during_rename" else 2  # the rename of an existing step is a re-save
    died_saving(run, step, f"checkpoint.{point}:kill@step={step}", monkeypatch, keep_last=1)
    tmp, final = root / f".{checkpoint_name(step)}.tmp", root / checkpoint_name(step)
    if point == "mid_shard":  # the model's newest shard was cut in half, as a death mid-write leaves it
        sizes = {p.name: p.stat().st_size for p in (tmp / "model").iterdir()}
        whole = {
            p.name: p.stat().st_size for p in (first / "model").iterdir()
        }  # the same weights, saved whole
        assert sizes.keys() == whole.keys()
        cut = [(whole[name], sizes[name]) for name in sizes if sizes[name] != whole[name]]
        assert len(cut) == 1 and cut[0][1] == cut[0][0] // 2, cut
        assert not (tmp / "optimizer").exists()
    if point == "before_manifest":
        assert (tmp / TRAINER_STATE).is_file() and not (tmp / "manifest.json").exists()
    if point == "before_rename":
        verify_checkpoint(tmp)
        assert not final.exists()
    if point == "during_rename":  # the valid step 1 moved aside, the new one not yet in its place
        assert (root / f".{first.name}.old").is_dir() and tmp.is_dir() and not first.exists()
    if point == "after_rename":  # in place, the older one not yet pruned
        assert sorted(p.name for p in root.iterdir()) == [first.name, final.name]
        verify_checkpoint(final)
    newest = start_checkpoint(run.root, run.cfg, "auto")
    assert newest == (final if point == "after_rename" else first)
    verify_checkpoint(newest)
    assert sorted(p.name for p in root.iterdir()) == sorted({first.name, final.name} if point == "after_rename"
                                                            else {first.name})  # fmt: skip
    assert run.save(step, keep_last=1) == final  # the next save over the leftovers
    assert sorted(p.name for p in root.iterdir()) == [final.name]


def test_fsync_tree_syncs_every_file_and_directory(tmp_path, monkeypatch):
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("reads /proc/self/fd (Linux)")
    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ("x", "a/y", "a/b/z"):
        (tmp_path / name).write_text(name)
    synced: list[Path] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    ckpt._fsync_tree(tmp_path)
    assert sorted(synced) == sorted([tmp_path, *tmp_path.rglob("*")])


def test_a_save_without_a_process_group_warns_nothing_but_what_matters(debug_config, tmp_path, monkeypatch):
    """DCP's warning that it runs without a process group is the one a save hides."""
    run = Run(debug_config, "llama", tmp_path / "run")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run.save(1)
    assert not [w for w in caught if "torch.distributed is disabled" in str(w.message)]
    real_save = ckpt.dcp.save

    def save_with_a_warning(*args, **kwargs):
        warnings.warn("a storage warning the user must see", UserWarning, stacklevel=1)
        return real_save(*args, **kwargs)

    monkeypatch.setattr(ckpt.dcp, "save", save_with_a_warning)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run.save(2)
    assert [str(w.message) for w in caught] == ["a storage warning the user must see"] * 2  # model, optimizer


def test_pipeline_stages_save_under_the_whole_models_names(debug_config, tmp_path):
    """One rank's two pipeline stages of a tied gpt2 save one checkpoint that the whole model loads,
    and the whole model's checkpoint loads into a last stage (the head's copy under the embedding's name)."""
    whole = Run(debug_config, "gpt2", tmp_path / "whole")
    stages = [stage_module(whole.model, i, 2) for i in range(2)]
    assert stages[1].wte is None and stages[1].lm_head is not None
    optimizers = [build_optimizer(stage, whole.cfg.optim, "cpu") for stage in stages]
    torch.manual_seed(2)
    grads = {name: torch.randn_like(p) for name, p in whole.model.named_parameters()}
    for stage, optimizer in zip(stages, optimizers, strict=True):
        for name, p in stage.named_parameters():
            p.grad = grads["wte.weight" if name == "lm_head.weight" else name].clone()
        optimizer.step()

    last_tensors, _ = _optimizer_state(stages[1], optimizers[1])
    assert {k.removeprefix("state.").rsplit(".", 1)[0] for k in last_tensors} == set(
        model_state_dict(stages[1])
    )
    assert "state.wte.weight.exp_avg" in last_tensors

    final = save_checkpoint(tmp_path / "pp", 1, stages, optimizers, TRAINER, whole.cfg, whole.tokenizer, 1)
    loaded = Run(debug_config, "gpt2", tmp_path / "loaded", steps=1, seed=3)
    load_checkpoint(final, loaded.model, loaded.optimizer)
    expected = {**model_state_dict(stages[0]), **model_state_dict(stages[1])}
    assert same_tensors(model_state_dict(loaded.model), expected)
    moments = {**_optimizer_state(stages[0], optimizers[0])[0], **last_tensors}
    assert same_tensors(_optimizer_state(loaded.model, loaded.optimizer)[0], moments)

    # The whole model's checkpoint, resumed as the last of 2 stages.
    whole_ckpt = loaded.save(2)
    last = stage_module(Run(debug_config, "gpt2", tmp_path / "other", steps=1, seed=4).model, 1, 2)
    last_optimizer = build_optimizer(last, whole.cfg.optim, "cpu")
    load_checkpoint(whole_ckpt, [last], [last_optimizer])
    assert torch.equal(last.lm_head.weight, loaded.model.wte.weight)
    state = last_optimizer.state[last.lm_head.weight]
    assert torch.equal(state["exp_avg"], loaded.optimizer.state[loaded.model.wte.weight]["exp_avg"])

    # The two-stage checkpoint, resumed as the same two stages.
    fresh = Run(debug_config, "gpt2", tmp_path / "fresh", steps=1, seed=5)
    again = [stage_module(fresh.model, i, 2) for i in range(2)]
    again_optimizers = [build_optimizer(stage, whole.cfg.optim, "cpu") for stage in again]
    load_checkpoint(final, again, again_optimizers)
    for i in range(2):
        assert same_tensors(model_state_dict(again[i]), model_state_dict(stages[i]))
        assert same_tensors(_optimizer_state(again[i], again_optimizers[i])[0],
                            _optimizer_state(stages[i], optimizers[i])[0])  # fmt: skip


def test_a_scalar_saved_for_one_parameter_stands_for_all(debug_config, tmp_path):
    """Rank 0 saves the optimizer scalars of its own parameters (a pipeline's first stage, say): the
    parameters it does not hold take the value saved under the same scalar name."""
    saved = Run(debug_config, "llama", tmp_path / "run", steps=3)
    first_param = next(saved.model.parameters())
    saved.optimizer.zero_grad(set_to_none=True)
    first_param.grad = torch.randn_like(first_param)
    saved.optimizer.step()  # a fourth step for this one (the others had no gradient)
    final = saved.save(1)
    exact = Run(debug_config, "llama", tmp_path / "exact", steps=1, seed=3)
    load_checkpoint(final, exact.model, exact.optimizer)  # every parameter's own step
    assert [exact.optimizer.state[p]["step"].item() for p in exact.model.parameters()] == [
        saved.optimizer.state[p]["step"].item() for p in saved.model.parameters()
    ]
    assert exact.optimizer.state[next(exact.model.parameters())]["step"].item() == 4.0
    state = json.loads((final / TRAINER_STATE).read_text())
    first_name = next(saved.model.named_parameters())[0]
    kept = next(
        k for k in sorted(state["optimizer"]["scalars"]) if k != f"state.{first_name}.step"
    )  # 3 steps
    state["optimizer"]["scalars"] = {kept: state["optimizer"]["scalars"][kept]}
    (final / TRAINER_STATE).write_text(json.dumps(state))
    loaded = Run(debug_config, "llama", tmp_path / "other", steps=1, seed=3)
    load_checkpoint(final, loaded.model, loaded.optimizer)
    steps = [s["step"] for s in loaded.optimizer.state.values()]
    assert len(steps) == len(list(loaded.model.parameters()))
    assert all(step.dtype == torch.float32 and step.item() == 3.0 for step in steps)


def test_an_interrupted_resave_is_put_back(tmp_path):
    root = tmp_path / "checkpoints"
    (root / ".step_0000004.old").mkdir(parents=True)  # moved aside, the new one never renamed in
    (root / ".step_0000004.old" / "x").write_text("the valid one")
    (root / ".step_0000006.old").mkdir()  # moved aside and the new one in place: the old one goes
    (root / "step_0000006").mkdir()
    (root / "step_0000006" / "x").write_text("new")
    (root / ".step_0000007.tmp" / "model").mkdir(parents=True)  # a save that died: never valid
    (root / ".step_0000008.tmp").write_text("")  # not a directory: left, it does not stop the recovery
    recover_interrupted_save(root)
    assert sorted(p.name for p in root.iterdir()) == [".step_0000008.tmp", "step_0000004", "step_0000006"]
    assert (root / "step_0000004" / "x").read_text() == "the valid one"
    assert (root / "step_0000006" / "x").read_text() == "new"


def test_the_rng_state_round_trips_through_json():
    torch.manual_seed(3)
    torch.rand(5)
    state = json.loads(json.dumps(rng_state()))
    expected = torch.rand(8)
    torch.manual_seed(4)
    set_rng_state(state)
    assert torch.equal(torch.rand(8), expected)
    if not torch.cuda.is_available():
        assert set(state) == {"torch"}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_cuda_rng_round_trips_through_json():
    torch.cuda.manual_seed_all(3)
    torch.rand(5, device="cuda")
    state = json.loads(json.dumps(rng_state()))
    assert len(state["cuda"]) == torch.cuda.device_count()
    expected = torch.rand(8, device="cuda")
    torch.cuda.manual_seed_all(4)
    set_rng_state(state)
    assert torch.equal(torch.rand(8, device="cuda"), expected)


def test_optimizer_scalars_come_back_as_tensors_of_their_dtype():
    value = _from_json({"tensor": 3, "dtype": "int64"})
    assert value.dtype == torch.int64 and value.item() == 3 and value.ndim == 0
    assert _from_json({"tensor": 2.5, "dtype": "float64"}).dtype == torch.float64
    assert _from_json({"tensor": 3, "dtype": "float32"}).dtype == torch.float32  # not int64 from the int
    assert _from_json([0.9, 0.95]) == [0.9, 0.95]  # not a tensor: as saved
    for bad in ({"tensor": 1, "dtype": "Tensor"}, {"tensor": "1", "dtype": "int64"}, {"tensor": 1}):
        with pytest.raises(CheckpointError) as err:
            _from_json(bad)
        assert str(err.value) == f"trainer state: optimizer scalar {bad} is not a number of a torch dtype"


def test_optimizer_state_splits_tensors_from_scalars(debug_config, tmp_path):
    run = Run(debug_config, "gpt2", tmp_path, steps=1)
    tensors, rest = _optimizer_state(run.model, run.optimizer)
    names = {k.removeprefix("state.").rsplit(".", 1)[0] for k in tensors}
    assert names == set(model_state_dict(run.model))  # checkpoint names, the tied head under one
    assert {k.rsplit(".", 1)[1] for k in tensors} == {"exp_avg", "exp_avg_sq"}
    assert set(rest["scalars"]) == {k.rsplit(".", 1)[0] + ".step" for k in tensors}
    assert rest["param_groups"] and all("lr" in g for g in rest["param_groups"])


GOOD = {"step": 3, "rng": {"torch": "AAAA"}, "optimizer": {"scalars": {}}, "loader": {}}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (pickle.dumps(GOOD), "is not a JSON file (UnicodeDecodeError: "),
        (b"{not json", "is not a JSON file (JSONDecodeError: Expecting property name"),
        (json.dumps([GOOD]).encode(), "has no integer 'step'"),
        (json.dumps({**GOOD, "step": "3"}).encode(), "has no integer 'step'"),
        (json.dumps({**GOOD, "rng": None}).encode(), "has no 'rng' mapping"),
        (json.dumps({**GOOD, "optimizer": []}).encode(), "has no 'optimizer' mapping"),
        (json.dumps({k: v for k, v in GOOD.items() if k != "loader"}).encode(), "has no 'loader' mapping"),
        (json.dumps({**GOOD, "optimizer": {}}).encode(), "lacks 'optimizer.scalars' or 'rng.torch'"),
        (json.dumps({**GOOD, "rng": {"torch": 1}}).encode(), "lacks 'optimizer.scalars' or 'rng.torch'"),
    ],
)
def test_a_trainer_state_that_is_not_ours_is_refused_by_name(tmp_path, content, message):
    (tmp_path / TRAINER_STATE).write_bytes(content)
    with pytest.raises(CheckpointError) as err:
        load_trainer_state(tmp_path)
    assert str(err.value).startswith(f"trainer state {tmp_path / TRAINER_STATE} {message}")
    assert "\n" not in str(err.value) and err.value.__cause__ is None


def test_a_missing_trainer_state_is_named(tmp_path):
    with pytest.raises(CheckpointError) as err:
        load_trainer_state(tmp_path)
    assert str(err.value).startswith(
        f"trainer state {tmp_path / TRAINER_STATE} is not a JSON file (FileNotFoundError: "
    )
    deep = tmp_path / ("a-long-directory-name-" * 6)  # the OS error's text, with the path, is cut at 120
    deep.mkdir()
    with pytest.raises(CheckpointError) as err:
        load_trainer_state(deep)
    reason = f"[Errno 2] No such file or directory: '{deep / TRAINER_STATE}'"
    assert len(reason) > 120
    assert (
        str(err.value)
        == f"trainer state {deep / TRAINER_STATE} is not a JSON file (FileNotFoundError: {reason[:120]})"
    )
    (tmp_path / TRAINER_STATE).write_text(json.dumps(GOOD))
    assert load_trainer_state(tmp_path) == GOOD


def test_a_checkpoint_of_another_optimizer_is_refused(debug_config, tmp_path):
    final = Run(debug_config, "llama", tmp_path / "sgd", optim="sgd").save(1)  # no moments
    adamw = Run(debug_config, "llama", tmp_path / "adamw")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(final, [adamw.model], [adamw.optimizer])
    assert str(err.value).startswith(f"checkpoint {final / 'optimizer'} lacks tensor 'state.")
    assert str(err.value).endswith(".exp_avg' (another optimizer?)")


# ---------------------------------------------------------------------------- which checkpoint a run starts from


@pytest.fixture
def saved_run(debug_config, tmp_path) -> Run:
    """A run directory with checkpoints at steps 2 and 4."""
    run = Run(debug_config, "llama", tmp_path / "run")
    run.save(2)
    run.save(4)
    return run


def test_a_new_run_starts_from_nothing_and_refuses_a_directory_with_checkpoints(saved_run, tmp_path):
    assert start_checkpoint(tmp_path / "new", saved_run.cfg, False) is None
    assert start_checkpoint(tmp_path / "new", saved_run.cfg, "auto") is None
    with pytest.raises(CheckpointError) as err:
        start_checkpoint(saved_run.root, saved_run.cfg, False)
    assert str(err.value) == (
        f"run directory {saved_run.root} already has checkpoints: pass --resume (or --resume auto), "
        "or choose another --out"
    )


def test_resume_takes_the_newest_valid_checkpoint(saved_run):
    newest = saved_run.root / "checkpoints" / checkpoint_name(4)
    assert start_checkpoint(saved_run.root, saved_run.cfg, True) == newest
    assert start_checkpoint(saved_run.root, saved_run.cfg, "auto") == newest
    (newest / TRAINER_STATE).write_text("{}")  # corrupt: its checksum no longer matches
    with pytest.warns(UserWarning, match=f"skipping checkpoint {newest.name}"):
        assert start_checkpoint(saved_run.root, saved_run.cfg, True) == newest.parent / checkpoint_name(2)


def test_resume_from_a_given_checkpoint_verifies_it(saved_run):
    given = saved_run.root / "checkpoints" / checkpoint_name(2)
    assert start_checkpoint(saved_run.root, saved_run.cfg, str(given)) == given
    assert start_checkpoint(saved_run.root, saved_run.cfg, given) == given
    (given / "config.yaml").write_text("changed")
    with pytest.raises(CheckpointError, match=r"config\.yaml has \d+ bytes, the manifest says"):
        start_checkpoint(saved_run.root, saved_run.cfg, given)


def test_resume_without_a_run_directory_is_an_error(tmp_path, debug_config):
    with pytest.raises(CheckpointError) as err:
        start_checkpoint(tmp_path / "absent", debug_config(), True)
    assert str(err.value) == f"cannot resume: run directory {tmp_path / 'absent'} does not exist"
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="has no checkpoint to resume from"):
        start_checkpoint(tmp_path / "empty", debug_config(), True)


def test_an_interrupted_resave_is_recovered_before_the_choice(saved_run):
    root = saved_run.root / "checkpoints"
    os.replace(root / checkpoint_name(4), root / f".{checkpoint_name(4)}.old")  # died between the renames
    assert start_checkpoint(saved_run.root, saved_run.cfg, "auto") == root / checkpoint_name(4)
    assert sorted(p.name for p in root.iterdir()) == [checkpoint_name(2), checkpoint_name(4)]


def test_a_resumed_run_may_change_how_long_it_trains_not_what(saved_run, debug_config):
    flavor = {"family": "llama", "flavor": "debug"}
    longer = debug_config(model=flavor, train={"max_steps": 1000}, data={"num_workers": 2})
    assert start_checkpoint(saved_run.root, longer, True) == saved_run.root / "checkpoints" / checkpoint_name(
        4
    )
    for section, change in (("model", {"flavor": "tiny"}), ("data", {"seq_len": 32})):
        other = debug_config(**{section: {**(flavor if section == "model" else {}), **change}})
        with pytest.raises(ConfigError) as err:
            start_checkpoint(saved_run.root, other, True)
        assert str(err.value).startswith(
            f"cannot resume {saved_run.root}: config section '{section}' differs from the run's config.yaml ("
        )


def test_a_restarted_torchrun_attempt_resumes_only_what_its_job_started(saved_run, monkeypatch):
    newest = saved_run.root / "checkpoints" / checkpoint_name(4)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-1")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    assert restart_count() == 0
    mark_job(saved_run.root)  # the first attempt started the run
    assert (saved_run.root / JOB_MARKER).read_text() == "job-1"
    with pytest.raises(CheckpointError, match="already has checkpoints"):
        start_checkpoint(saved_run.root, saved_run.cfg, False)  # the first attempt itself: a new run
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert restart_count() == 1
    assert start_checkpoint(saved_run.root, saved_run.cfg, False) == newest
    mark_job(saved_run.root)  # a restarted attempt does not claim the run
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-2")
    mark_job(saved_run.root)
    assert (saved_run.root / JOB_MARKER).read_text() == "job-1"
    with pytest.raises(CheckpointError, match="already has checkpoints"):
        start_checkpoint(saved_run.root, saved_run.cfg, False)  # another job's run
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    with pytest.raises(CheckpointError, match="already has checkpoints"):
        start_checkpoint(saved_run.root, saved_run.cfg, False)  # not under torchrun
    (saved_run.root / JOB_MARKER).unlink()
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-1")
    with pytest.raises(CheckpointError, match="already has checkpoints"):
        start_checkpoint(saved_run.root, saved_run.cfg, False)  # no marker: the job refused it first


def test_outside_torchrun_no_job_is_marked(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    assert restart_count() == 0
    mark_job(tmp_path)
    assert not (tmp_path / JOB_MARKER).exists()

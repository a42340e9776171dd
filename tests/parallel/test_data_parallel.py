"""DDP, FSDP2 and HSDP on CPU with gloo, launched by torchrun exactly as a user would.

Each layout trains the debug model for a few steps on the same global batch as one process; the
losses must agree within 1e-5 relative, and checkpoints must resume under another layout.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

RECIPE = Path(__file__).parents[2] / "recipes" / "debug.yaml"
GLOBAL_BATCH = 8  # sequences per optimizer step, in every layout


def losses(run: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def common_args(data_dir: Path, out: Path, dp: int, *extra: str) -> list[str]:
    return [
        "pretrain", "--config", str(RECIPE), "--out", str(out), f"--data.dir={data_dir}",
        "--logging.progress=false", "--logging.tensorboard=false", "--logging.plot=false",
        "--train.max_steps=10", "--train.eval_every=0", "--train.sample_tokens=0", "--checkpoint.every_steps=5",
        f"--train.micro_batch_size={GLOBAL_BATCH // dp}", "--logging.log_every=1", *extra,
    ]  # fmt: skip


def launch(nproc: int, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    if nproc == 1:
        command = [sys.executable, "-m", "lmforge", *args]
    else:
        # --standalone: a rendezvous on a free localhost port, as for a one-node job.
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
                   "-m", "lmforge", *args]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, timeout=150)


def launch_failing(nproc: int, args: list[str], cwd: Path) -> list[str]:
    """Launch `nproc` ranks as `launch` does, expecting them to fail: each rank's stderr, in rank order.

    torchrun writes each rank's stderr to its own file (--redirects 2), apart from torchrun's own
    report of the failure (which has a traceback of torchrun's code), so the ranks' lines can be
    checked exactly.
    """
    logs = cwd / "rank_logs"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
               "--redirects", "2", "--log-dir", str(logs), "-m", "lmforge", *args]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, cwd=cwd, timeout=150)
    assert result.returncode != 0, result.stderr[-3000:]
    files = sorted(logs.glob("*/attempt_0/*/stderr.log"), key=lambda path: int(path.parent.name))
    assert [int(path.parent.name) for path in files] == list(range(nproc)), files
    return [path.read_text() for path in files]


def assert_one_line_error_on_every_rank(stderrs: list[str], prefix: str, message: str) -> None:
    """Every rank's stderr is exactly one line, the same `prefix...` error containing `message`; a rank
    may have written nothing, if torchrun stopped it after another rank failed, but one at least did."""
    written = [stderr for stderr in stderrs if stderr]
    assert written, stderrs
    for stderr in written:
        assert len(stderr.splitlines()) == 1 and stderr == written[0], stderrs
    assert written[0].startswith(prefix) and message in written[0], written[0]


def assert_close(got: dict[int, float], want: dict[int, float], steps=None) -> None:
    steps = steps or sorted(want)
    for step in steps:
        assert abs(got[step] - want[step]) <= 1e-5 * abs(want[step]), (step, got[step], want[step])


@pytest.fixture(scope="module")
def reference(prepared_dir, tmp_path_factory) -> Path:
    """One process, the same global batch."""
    out = tmp_path_factory.mktemp("single") / "run"
    result = launch(1, common_args(prepared_dir, out, 1), out.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.mark.parametrize(
    ("name", "nproc", "dp", "layout"),
    [
        ("ddp", 2, 2, ["--parallel.dp_replicate=2", "--parallel.dp_shard=1"]),
        ("fsdp", 2, 2, []),  # dp_shard=-1 takes the whole world
        ("fsdp_no_reshard", 2, 2, ["--parallel.fsdp_reshard_after_forward=false"]),
        ("fsdp_full_ac", 2, 2, ["--train.activation_checkpointing=full"]),
        (
            "pp_selective_ac",
            2,
            1,
            ["--parallel.pp=2", "--parallel.dp_shard=1", "--train.activation_checkpointing=selective"],
        ),  # fmt: skip
        ("hsdp", 4, 4, ["--parallel.dp_replicate=2", "--parallel.dp_shard=2"]),
        ("tp", 2, 1, ["--parallel.tp=2", "--parallel.dp_shard=1"]),
        ("fsdp_tp", 4, 2, ["--parallel.tp=2"]),
        ("pp_gpipe", 2, 1, ["--parallel.pp=2", "--parallel.dp_shard=1", "--parallel.pp_schedule=gpipe"]),
        ("pp_1f1b", 2, 1, ["--parallel.pp=2", "--parallel.dp_shard=1", "--parallel.pp_microbatches=4"]),
        ("fsdp_pp", 4, 2, ["--parallel.pp=2", "--parallel.pp_microbatches=2"]),
        (
            "fsdp_tp_pp",
            8,
            2,
            [
                "--parallel.pp=2",
                "--parallel.tp=2",
                "--parallel.pp_microbatches=2",
                "--parallel.sequence_parallel=false",
            ],
        ),
    ],
)
def test_layout_matches_single_process(name, nproc, dp, layout, prepared_dir, reference, tmp_path):
    out = tmp_path / name
    result = launch(nproc, common_args(prepared_dir, out, dp, *layout), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_close(losses(out), losses(reference))
    assert result.stdout.count('"val_loss"') == 1  # one summary line, from rank 0


@pytest.mark.parametrize(
    ("saved", "resumed"),
    [
        ((2, 2, []), (1, 1, [])),  # FSDP on 2 ranks -> 1 process
        ((1, 1, []), (2, 2, [])),  # 1 process -> FSDP on 2 ranks
        ((2, 1, ["--parallel.tp=2", "--parallel.dp_shard=1"]), (1, 1, [])),  # TP 2 -> none
        ((2, 1, ["--parallel.pp=2", "--parallel.dp_shard=1"]), (1, 1, [])),  # PP 2 -> none
        ((1, 1, []), (2, 1, ["--parallel.pp=2", "--parallel.dp_shard=1"])),  # none -> PP 2
    ],
    ids=["fsdp2-to-1", "1-to-fsdp2", "tp2-to-1", "pp2-to-1", "1-to-pp2"],
)
def test_checkpoint_resumes_under_another_layout(saved, resumed, prepared_dir, reference, tmp_path):
    """A checkpoint written under one layout continues under another with the same losses."""
    out = tmp_path / "run"
    if saved[0] == 1:
        shutil.copytree(reference, out)
    else:
        result = launch(saved[0], common_args(prepared_dir, out, saved[1], *saved[2]), tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
    shutil.rmtree(out / "checkpoints" / "step_0000010")  # resume from step 5
    result = launch(resumed[0], common_args(prepared_dir, out, resumed[1], *resumed[2], "--resume"), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_close(losses(out), losses(reference), steps=[6, 7, 8, 9, 10])


def test_layout_that_does_not_fit_the_world_fails_fast(prepared_dir, tmp_path):
    args = common_args(
        prepared_dir, tmp_path / "bad", 2, "--parallel.dp_replicate=3", "--parallel.dp_shard=1"
    )
    stderrs = launch_failing(2, args, tmp_path)
    assert all(stderrs), stderrs  # both ranks check the layout before anything else can fail
    assert_one_line_error_on_every_rank(stderrs, "lmforge: error: parallel layout", "world size is 2")
    assert not (tmp_path / "bad" / "checkpoints").exists()


def test_meta_init_materialises_only_shards_and_trains(prepared_dir, tmp_path):
    """parallel.meta_init: FSDP over a model built on the meta device, then initialised shard by shard."""
    out = tmp_path / "meta"
    result = launch(
        2, common_args(prepared_dir, out, 2, "--parallel.meta_init=true", "--train.max_steps=12"), tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    got = losses(out)
    assert len(got) == 12 and all(math.isfinite(v) for v in got.values())
    assert sum(got[s] for s in (10, 11, 12)) / 3 < sum(got[s] for s in (1, 2, 3)) / 3 - 0.1


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        (["--parallel.tp=2", "--parallel.dp_shard=1", "--model.family=gpt2", "--data.seq_len=63"], "seq_len"),
        (["--parallel.pp=2", "--parallel.dp_shard=1", "--parallel.pp_microbatches=3"], "not divisible"),
        (
            [
                "--parallel.pp=2",
                "--parallel.tp=1",
                "--parallel.dp_shard=1",
                "--parallel.pp_schedule=interleaved_1f1b",
            ],
            "layers",
        ),
        (["--parallel.fsdp_cpu_offload=true"], "needs train.device cuda"),
        (["--optim.name=muon"], "'muon' orthogonalises whole matrices"),
    ],
    ids=["tp-seq-len", "pp-microbatches", "pp-more-stages-than-layers", "cpu-offload-on-cpu", "muon-fsdp"],
)
def test_layout_the_model_cannot_take_fails_fast(layout, message, prepared_dir, tmp_path):
    stderrs = launch_failing(2, common_args(prepared_dir, tmp_path / "bad", 1, *layout), tmp_path)
    assert_one_line_error_on_every_rank(stderrs, "lmforge: error: parallel", message)


@pytest.mark.slow  # inductor compiles the debug model in each of 2 processes (~20 s a layout)
@pytest.mark.parametrize(
    "layout",
    [["--parallel.dp_replicate=2", "--parallel.dp_shard=1"], [], ["--train.compile_scope=model"]],
    ids=["ddp", "fsdp", "fsdp-whole-model"],
)
def test_compiled_model_trains_like_eager_under_ddp_and_fsdp(layout, prepared_dir, reference, tmp_path):
    # torch.compile is on by default on CUDA, where DDP and FSDP2 run it: the compiled blocks (FSDP's
    # hooks stay outside them) must give the eager single-process losses, up to kernel rounding.
    out = tmp_path / "run"
    result = launch(2, common_args(prepared_dir, out, 2, "--train.compile=true", *layout), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "compile=True" in result.stdout
    got, want = losses(out), losses(reference)
    assert sorted(got) == sorted(want)
    for step in want:
        assert abs(got[step] - want[step]) <= 1e-3 * abs(want[step]), (step, got[step], want[step])


def test_fused_projections_under_fsdp_give_the_single_process_losses(prepared_dir, reference, tmp_path):
    out = tmp_path / "run"
    result = launch(2, common_args(prepared_dir, out, 2, "--train.fused_projections=true"), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_close(losses(out), losses(reference))


@pytest.mark.parametrize(
    ("switches", "message"),
    [
        (["--train.compile=true", "--train.compile_mode=reduce-overhead"], "records CUDA graphs"),
    ],
    ids=["cuda-graphs-distributed"],
)
def test_speed_switch_the_layout_cannot_take_fails_fast(switches, message, prepared_dir, tmp_path):
    stderrs = launch_failing(2, common_args(prepared_dir, tmp_path / "bad", 1, *switches), tmp_path)
    assert_one_line_error_on_every_rank(stderrs, "lmforge: error: config key", message)


def test_export_gathers_a_sharded_checkpoint_into_one_file(prepared_dir, reference, tmp_path):
    """FSDP x TP on 4 ranks -> one safetensors file holding the same tensors as a 1-process checkpoint."""
    from safetensors.torch import load_file

    out = tmp_path / "run"
    result = launch(4, common_args(prepared_dir, out, 2, "--parallel.tp=2"), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    exported = launch(1, ["export", str(out), "--out", str(tmp_path / "export")], tmp_path)
    assert exported.returncode == 0, exported.stderr[-3000:]
    sharded = load_file(tmp_path / "export" / "model.safetensors")
    single = {}
    for file in (reference / "checkpoints" / "step_0000010" / "model").glob("*.safetensors"):
        single.update(load_file(file))
    assert sharded.keys() == single.keys()
    for name, tensor in single.items():
        assert sharded[name].shape == tensor.shape
        assert (sharded[name] - tensor).abs().max() < 1e-4, name  # 10 steps of the same training

"""The planner (`lmforge plan`): monotone where it must be, one source of truth with the trainer,
close to published runs, and one clear line for every bad input."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest

from lmforge.cli import main
from lmforge.errors import ConfigError
from lmforge.hardware import cuda_device, device, devices
from lmforge.models import build_model, model_config
from lmforge.plan import planner
from lmforge.plan.planner import Job, Layout, PlanError, estimate, parse_model

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import plan_validation  # noqa: E402

H100 = device("h100-sxm")


def job_7b(n_gpus: int = 64, batch: int = 256, seq: int = 4096) -> Job:
    return Job(model_config("llama", "7b"), H100, n_gpus, seq, batch * seq)


def test_more_gpus_never_raise_fsdp_parameter_memory():
    previous = float("inf")
    for n in (8, 16, 32, 64, 128):
        e = estimate(job_7b(n), Layout(1, n, 1, 1, 1, "full"))
        state = e.memory["parameters"] + e.memory["gradients"] + e.memory["optimizer"]
        assert state < previous
        previous = state


def test_more_microbatches_never_raise_the_bubble_fraction():
    previous = float("inf")
    for batch in (8, 16, 32, 64, 128):  # dp 2 ranks x micro-batch 1: grad_accum = batch / 2
        e = estimate(job_7b(8, batch), Layout(1, 2, 1, 4, 1, "full"))
        fraction = e.step["bubble"] / e.step_time_s
        assert 0 < fraction < previous
        previous = fraction
    interleaved = estimate(job_7b(8, 128), Layout(1, 2, 1, 4, 1, "full", pp_schedule="interleaved_1f1b"))
    assert interleaved.step["bubble"] < e.step["bubble"]


def test_full_checkpointing_never_uses_more_activation_memory():
    by_mode = {ac: estimate(job_7b(), Layout(1, 64, 1, 1, 2, ac)) for ac in planner.AC_CHOICES}
    assert by_mode["full"].memory["activations"] < by_mode["selective"].memory["activations"]
    assert by_mode["selective"].memory["activations"] < by_mode["none"].memory["activations"]
    assert by_mode["full"].step["compute"] > by_mode["none"].step["compute"]  # recomputation costs


def test_flops_and_params_are_the_models_own():
    """One source of truth: the FLOPs per token `lmforge bench` and the logs report, and the
    parameter count of the built model."""
    job = job_7b()
    e = estimate(job, Layout(1, 64, 1, 1, 1, "full"))
    model = build_model(job.model, "meta")
    assert e.model_flops_per_token == model.flops_per_token(job.seq_len)
    one_rank = estimate(
        dataclasses.replace(job, n_gpus=1, global_batch_tokens=4 * 4096), Layout(1, 1, 1, 1, 1, "full")
    )
    assert one_rank.memory["parameters"] * 2**30 == 4 * model.num_params()


def test_published_runs():
    """docs/plan.md's table: the fitted row exactly, the out-of-sample rows within 20% but the one
    the doc explains (torchtitan's 500 W H100s, whose peak is below the datasheet's)."""
    ratios = {
        a.name.split(",")[0] + f" {a.job.n_gpus}": a.predicted() / a.published
        for a in plan_validation.anchors()
    }
    assert ratios["GPT-3 175B 1024"] == pytest.approx(1.0, abs=0.01)  # the fitted anchor
    assert 0.8 <= ratios["GPT-3 175B 1536"] <= 1.2
    assert 0.8 <= ratios["1T (1008B) 3072"] <= 1.2
    assert 1.0 < ratios["Llama 3.1 8B 8"] < 1.3


def test_catalogue_has_the_devices_and_sources():
    table = devices()
    for name in ("a100-40gb", "a100-80gb", "h100-sxm", "h100-pcie", "h200", "b200", "cpu"):
        assert name in table
    assert table["h100-sxm"].bf16_flops == 989e12 and table["h200"].memory_gib > 130
    text = Path(planner.__file__).parents[1].joinpath("hardware.yaml").read_text()
    entries = [line for line in text.splitlines() if line and not line.startswith((" ", "#"))]
    assert len(entries) == len(table)
    # every entry starts with a comment naming its source
    for name in table:
        after = text.split(f"\n{name}:\n", 1)[1]
        assert after.lstrip().startswith("#"), name


@pytest.mark.parametrize(
    ("cuda_name", "entry"),
    [
        ("NVIDIA H100 80GB HBM3", "h100-sxm"),
        ("NVIDIA H100 PCIe", "h100-pcie"),
        ("NVIDIA A100-SXM4-40GB", "a100-40gb"),
        ("NVIDIA A100-SXM4-80GB", "a100-80gb"),
        ("NVIDIA H200", "h200"),
        ("NVIDIA A10", "a10"),
        ("NVIDIA GeForce RTX 4090", "rtx-4090"),
        ("NVIDIA L40S", None),  # not an L4
        ("NVIDIA A10G", None),  # not an A10
        ("NVIDIA GH200 480GB", None),  # not an H200
        ("NVIDIA H100 NVL", "h100-nvl"),
    ],
)
def test_mfu_finds_the_device_by_its_cuda_name(cuda_name, entry):
    found = cuda_device(cuda_name)
    assert (found.name if found else None) == entry


def test_user_devices_from_yaml(tmp_path):
    extra = tmp_path / "mine.yaml"
    extra.write_text("mygpu:\n  bf16_tflops: 100\n  memory_gib: 32\n  memory_bandwidth_gbs: 900\n"
                     "  intra_node_gbs: 100\n  inter_node_gbs: 25\n  gpus_per_node: 4\n")  # fmt: skip
    assert device("mygpu", extra).gpus_per_node == 4
    extra.write_text("mygpu:\n  bf16_tflops: 100\n")
    with pytest.raises(ConfigError, match="lacks memory_gib"):
        device("mygpu", extra)


def test_custom_shapes_parse():
    cfg = parse_model("llama:dim=1024,n_layers=4,n_heads=8")
    assert (cfg.dim, cfg.n_layers, cfg.n_kv_heads, cfg.vocab_size) == (1024, 4, 8, 128256)
    assert parse_model("gpt2:175b,vocab_size=51200").vocab_size == 51200
    for bad in ("llama", "llama:nope", "llama:70b,dim", "mamba:7b", "llama:dim=100,n_heads=3"):
        with pytest.raises(PlanError):
            parse_model(bad)


# ---------------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------------


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["plan", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_command_ranks_layouts_and_writes_json_and_a_plot(capsys, tmp_path):
    png = tmp_path / "plan.png"
    code, out, err = run(capsys, "--model", "llama:7b", "--gpus", "64", "--gpu", "h100-sxm", "--seq", "4096",
                         "--global-batch-tokens", "1M", "--tokens", "1T", "--price", "2", "--json", "--plot", str(png))  # fmt: skip
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    keys = {
        "memory_gib_per_gpu",
        "fits",
        "step_time_s",
        "tokens_per_sec",
        "tflops_per_gpu",
        "mfu",
        "days",
        "cost",
    }
    assert keys <= set(rows[0])
    assert [r["recommended"] for r in rows].count(True) == 1 and rows[0]["recommended"] and rows[0]["fits"]
    fitting = [r["tokens_per_sec"] for r in rows if r["fits"]]
    assert fitting == sorted(fitting, reverse=True)
    assert rows[0]["cost"] == pytest.approx(rows[0]["gpu_hours"] * 2)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code, out, _ = run(capsys, "--model", "llama:7b", "--gpus", "64", "--global-batch-tokens", "1M")
    assert code == 0 and "* recommended:" in out and "days" in out


def test_command_evaluates_one_layout(capsys):
    code, out, err = run(capsys, "--model", "llama:dim=2048,n_layers=16,n_heads=16", "--gpus", "16", "--dp-shard", "8",
                         "--tp", "2", "--micro-batch", "1", "--ac", "full", "--json")  # fmt: skip
    assert code == 0, err
    (row,) = [json.loads(line) for line in out.splitlines()]
    assert row["layout"] == {"dp_replicate": 1, "dp_shard": 8, "tp": 2, "pp": 1, "micro_batch": 1, "ac": "full",
                             "precision": "bf16", "pp_schedule": "1f1b"}  # fmt: skip


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--gpu", "tpu-v9"], "unknown device 'tpu-v9'"),
        (["--tp", "3", "--gpus", "3"], "divisible by tp=3"),
        (["--pp", "64", "--gpus", "64"], "do not divide into 64 pipeline stages"),
        (["--dp-shard", "3"], "uses 3 GPUs"),
        (["--global-batch-tokens", "lots"], "is not a positive number"),
        (["--model", "llama:7b,dimm=3"], "unknown LlamaConfig field"),
        (["--precision", "fp8", "--gpu", "a100-80gb", "--dp-shard", "8"], "no fp8"),
        (["--micro-batch", "0", "--dp-shard", "8"], "micro-batch must be at least 1"),
        (["--tp", "0"], "must be at least 1"),
        (["--ac", "full"], "describe one layout"),
        (["--model", "llama:,"], "expected FAMILY:FLAVOR"),
        (["--global-batch-tokens", "inf"], "not a positive number"),
        (["--seq", "100000"], "exceeds the model's max_seq_len"),
        (["--plot", "/no/such/dir/x.png"], "not a file in an existing directory"),
        (["--plot", "/tmp"], "not a file in an existing directory"),
        (["--model", "llama:7b,qk_norm=maybe"], "must be true or false"),
        (["--model", "llama:7b,rope_theta=abc"], "must be a number"),
        (["--pp", "3", "--gpus", "3"], "do not divide into 3 pipeline stages"),
        (["--top", "-1"], "--top must be at least 1"),
    ],
)
def test_bad_input_gets_one_line(capsys, args, message):
    base = {"--model": "llama:7b", "--gpus": "8", "--gpu": "h100-sxm"}
    for flag, value in zip(args[::2], args[1::2], strict=False):
        base[flag] = value
    code, _, err = run(capsys, *[x for kv in base.items() for x in kv])
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("lmforge: error: ") and message in err


def test_a_model_that_fits_nowhere_gets_the_smallest_cluster(capsys):
    code, out, err = run(capsys, "--model", "llama:70b", "--gpus", "8", "--gpu", "h100-sxm", "--seq", "4096",
                         "--global-batch-tokens", "4194304")  # fmt: skip
    assert code == 2 and err.count("\n") == 1
    assert "no layout fits" in err and "the smallest cluster that fits: " in err
    n = int(err.split("the smallest cluster that fits: ")[1].split()[0])
    bigger = Job(model_config("llama", "70b"), H100, n, 4096, 4194304)
    assert any(e.fits for e in planner.plan(bigger))
    smaller = dataclasses.replace(bigger, n_gpus=n // 2)
    assert not any(e.fits for e in planner.plan(smaller))

"""precision auto on CPUs (bf16 where the CPU computes it natively), the choice recorded and used by
evaluation and generation, exact resume in bf16, and torch.compile falling back to eager on a CPU
without a working C++ compiler."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from lmforge import cli, runtime
from lmforge.data.loader import val_batches
from lmforge.data.tokenizer import load_tokenizer
from lmforge.errors import ConfigError
from lmforge.evaluate.perplexity import bits_per_byte, token_byte_lengths
from lmforge.infer import generate as generate_module
from lmforge.infer.generate import generate
from lmforge.models import build_model, model_config
from lmforge.rundir import decode_precision, latest_checkpoint, run_precision
from lmforge.runtime import describe_precision, resolve_precision
from lmforge.train.metrics import read_metrics
from lmforge.train.pretrain import pretrain

CPU = torch.device("cpu")
RECIPES = Path(__file__).parents[2] / "recipes"


@pytest.fixture
def cpu_bf16(monkeypatch):
    """cpu_bf16(answer): make this CPU report native bf16 (`answer`, e.g. "AMX") or none (None)."""

    def set_answer(answer: str | None) -> None:
        monkeypatch.setattr(runtime, "cpu_native_bf16", lambda: answer)

    return set_answer


def test_auto_precision_on_cpu_follows_native_bf16(cpu_bf16):
    cpu_bf16("AMX")
    assert resolve_precision("auto", CPU) == torch.bfloat16
    assert describe_precision("auto", CPU) == "bf16 (auto: this CPU computes bf16 natively with AMX)"
    cpu_bf16(None)
    assert resolve_precision("auto", CPU) == torch.float32
    assert describe_precision("auto", CPU) == "fp32 (auto: this CPU has no native bf16)"
    # An explicit choice is kept whatever the CPU has.
    assert resolve_precision("bf16", CPU) == torch.bfloat16 and describe_precision("bf16", CPU) == "bf16"
    with pytest.raises(ConfigError, match="'fp16'"):
        resolve_precision("fp16", CPU)


@pytest.mark.skipif(
    platform.machine() != "x86_64"
    or not Path("/proc/cpuinfo").is_file()
    or not torch.backends.mkldnn.is_available(),
    reason="reads x86 Linux CPU flags; oneDNN needed for bf16",
)
def test_native_bf16_detection_agrees_with_the_cpu_flags():
    flags = set(Path("/proc/cpuinfo").read_text().split("flags")[1].split("\n")[0].split())
    expected = "AMX" if "amx_tile" in flags else "AVX512_BF16" if "avx512_bf16" in flags else None
    assert runtime.cpu_native_bf16() == expected


@pytest.mark.parametrize("native", ["AMX", None])
def test_the_run_says_and_records_which_precision_auto_chose(
    debug_config, tmp_path, capsys, monkeypatch, cpu_bf16, native
):
    cpu_bf16(native)
    chosen = "bf16" if native else "fp32"
    run = tmp_path / "run"
    pretrain(debug_config(train={"max_steps": 2, "eval_every": 0, "precision": "auto"}), run)
    first_line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("model "))
    assert f"cpu {chosen} (auto: " in first_line
    for config in (run / "config.yaml", latest_checkpoint(run) / "config.yaml"):
        assert yaml.safe_load(config.read_text())["train"]["precision"] == chosen
    # Evaluation takes the run's choice (`lmforge eval` says which); `lmforge generate` decodes one
    # prompt in fp32 on a CPU (rundir.decode_precision) and hands that to generate().
    assert run_precision(latest_checkpoint(run), CPU) == (torch.bfloat16 if native else torch.float32)
    capsys.readouterr()
    cli.evaluate(str(run), batches=1, batch_size=2, device="cpu")
    assert json.loads(capsys.readouterr().out)["dtype"] == chosen
    given = []

    def recording_generate(*args):
        given.append(args[-1])  # dtype, the last positional argument
        return iter([])

    monkeypatch.setattr(generate_module, "generate", recording_generate)
    cli.generate(str(run), prompt="def ", max_new_tokens=2, device="cpu")
    assert given == [torch.float32]


def test_run_precision_on_cpu(debug_config, tmp_path, cpu_bf16):
    """A run trained in bf16 or fp16 is evaluated in what auto picks on this CPU; fp32 stays fp32."""
    runs = {}
    for precision in ("fp32", "bf16"):
        runs[precision] = tmp_path / precision
        pretrain(
            debug_config(train={"max_steps": 1, "eval_every": 0, "precision": precision}), runs[precision]
        )
    cpu_bf16(None)
    assert run_precision(latest_checkpoint(runs["bf16"]), CPU) == torch.float32
    cpu_bf16("AVX512_BF16")
    assert run_precision(latest_checkpoint(runs["bf16"]), CPU) == torch.bfloat16
    assert run_precision(latest_checkpoint(runs["fp32"]), CPU) == torch.float32
    # One sequence decodes in fp32 on a CPU: its matrix-vector products are faster there.
    assert decode_precision(latest_checkpoint(runs["bf16"]), CPU) == torch.float32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_generation_computes_in_the_given_dtype_and_leaves_the_callers_autocast_alone(dtype):
    torch.manual_seed(0)
    model = build_model(model_config("llama", "debug"))
    head_dtypes = []
    model.output.register_forward_hook(lambda module, args, out: head_dtypes.append(out.dtype))
    tokens = generate(model, [5, 6, 7], 4, temperature=0.0, dtype=dtype)
    first = next(tokens)  # suspended at its first yield
    assert not torch.is_autocast_enabled("cpu")
    assert len([first, *tokens]) == 4
    assert head_dtypes == [dtype] * 4  # the prefill and three decode steps


def test_bits_per_byte_counts_the_bytes_of_the_text(prepared_dir):
    tokenizer = load_tokenizer(prepared_dir / "tokenizer.json")
    lengths = token_byte_lengths(tokenizer)
    text = "def naïve(x):\n    return x * 2  # ✓ émoji 🙂\n"
    assert int(lengths[tokenizer.encode(text).ids].sum()) == len(text.encode("utf-8"))
    assert lengths[tokenizer.token_to_id("<|eos|>")] == 0
    targets = [y for _, y in val_batches(prepared_dir, 4, 64, 3)]
    n_tokens = sum(y.numel() for y in targets)
    n_bytes = sum(int(lengths[y.numpy()].sum()) for y in targets)
    assert bits_per_byte(2.0, targets, lengths) == pytest.approx(2.0 * n_tokens / n_bytes / np.log(2))


@pytest.mark.parametrize("optim", ["adamw", "muon"])
def test_resume_is_exact_in_bf16(debug_config, tmp_path, optim):
    """N steps + stop + resume + N steps == 2N straight steps, bit for bit, under bf16 autocast."""
    train = {"max_steps": 8, "eval_every": 0, "micro_batch_size": 4, "precision": "bf16"}
    sections = {"train": train, "optim": {"name": optim}, "checkpoint": {"every_steps": 4}}
    pretrain(debug_config(**sections), tmp_path / "straight")
    halves = {**sections, "schedule": {"total_steps": 8}}
    pretrain(debug_config(**{**halves, "train": {**train, "max_steps": 4}}), tmp_path / "stopped")
    pretrain(debug_config(**halves), tmp_path / "stopped", resume=True)
    losses = {name: {r["step"]: r["loss"] for r in read_metrics(tmp_path / name / "metrics.jsonl") if "loss" in r}
              for name in ("straight", "stopped")}  # fmt: skip
    assert losses["stopped"] == losses["straight"]
    assert len(losses["straight"]) == 8


def test_compile_without_a_cpp_compiler_trains_eagerly_after_one_warning(prepared_dir, tmp_path):
    env = {
        **os.environ,
        "CXX": str(tmp_path / "no-such-c++"),
        "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache"),
    }
    command = [sys.executable, "-m", "lmforge", "pretrain", "--config", str(RECIPES / "debug.yaml"),
               "--out", str(tmp_path / "run"), f"--data.dir={prepared_dir}", "--data.vocab_size=512",
               "--train.compile=true", "--train.max_steps=2", "--train.eval_every=0", "--logging.progress=false"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(result.stderr.splitlines()) == 1, result.stderr[-3000:]
    assert result.stderr.startswith(
        "lmforge: warning: torch.compile does not work on this CPU, training eagerly"
    )
    assert "no-such-c++" in result.stderr
    assert "compile=False" in result.stdout


def test_compiling_trains_the_same_weights_as_eager():
    """compile changes how the step computes, not what: the same initial weights and tokens (the
    check that the CPU can compile must not draw from the global RNG), so the same losses in fp32."""
    from lmforge.bench import bench
    from lmforge.train.compile import cpu_compile_unavailable

    cpu_compile_unavailable.cache_clear()  # the check runs again here, whatever ran it before
    rng = torch.get_rng_state()
    assert cpu_compile_unavailable() is None
    assert torch.equal(torch.get_rng_state(), rng)
    common = dict(batch_size=2, seq_len=32, steps=2, warmup=0, precision="fp32", device="cpu")
    eager = bench("llama", "debug", compile=False, **common)["loss"]
    compiled = bench("llama", "debug", compile=True, **common)["loss"]
    assert compiled == pytest.approx(eager, rel=1e-5)

"""Every CLI command on the debug flavor, and the one-line errors users get for their mistakes."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import lmforge
from lmforge.bench import interleaving_on_one_process
from lmforge.cli import main
from lmforge.config import load_config
from lmforge.data.loader import val_batches
from lmforge.data.tokenizer import special_ids
from lmforge.infer.generate import complete
from lmforge.runtime import resolve_device

RECIPES = Path(__file__).parents[2] / "recipes"


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "lmforge", *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, timeout=timeout)


def assert_one_line_error(result: subprocess.CompletedProcess, *names: str) -> None:
    """Exit code 2 and stderr exactly one line, `lmforge: error: ...`, which contains every one of `names`."""
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(result.stderr.splitlines()) == 1, result.stderr[-3000:]
    assert result.stderr.startswith("lmforge: error: "), result.stderr
    for name in names:
        assert name in result.stderr, result.stderr


def debug_args(prepared_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["pretrain", "--config", str(RECIPES / "debug.yaml"), "--out", str(out), f"--data.dir={prepared_dir}",
            "--logging.progress=false", *extra]  # fmt: skip


def test_pretrain_generate_eval(prepared_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(debug_args(prepared_dir, run, "--train.max_steps=4", "--checkpoint.every_steps=2")) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step"] == 4
    assert (run / "checkpoints" / "step_0000004" / "manifest.json").is_file()

    assert main(["generate", str(run), "--prompt", "def ", "--max-new-tokens", "8", "--seed", "0"]) == 0
    first = capsys.readouterr().out
    # The text the Python API gives for the same checkpoint, seed and sampling (the CLI's defaults).
    model, tokenizer = lmforge.load(run, device=resolve_device("auto"))
    continuation = complete(model, tokenizer, "def ", 8, temperature=0.8, top_k=50, top_p=None, seed=0)
    assert continuation.strip()
    assert first == "def " + continuation + "\n"
    assert main(["generate", str(run), "--prompt=def ", "--max_new_tokens=8", "--seed=0"]) == 0
    assert capsys.readouterr().out == first  # same seed, same text

    assert main(["eval", str(run), "--batches", "2", "--batch-size", "2", "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out)
    # The reference: the mean cross-entropy of the same model over the first 2 x 2 validation windows.
    seq_len = load_config(run / "config.yaml").data.seq_len
    batches = val_batches(prepared_dir, 2, seq_len, 2)
    model = model.cpu()
    with torch.no_grad():
        losses = [F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item() for x, y in batches]
    assert len(batches) == 2 and result["val_tokens"] == 2 * 2 * seq_len
    assert result["checkpoint"] == str(run / "checkpoints" / "step_0000004")
    assert result["val_loss"] == pytest.approx(sum(losses) / 2, rel=1e-5)
    assert result["val_ppl"] == pytest.approx(math.exp(result["val_loss"]), rel=1e-9)
    assert 0 < result["val_bits_per_byte"] < result["val_loss"] / math.log(2)  # tokens hold more than a byte

    # Any text: one document, tokenized as the data command writes it (its tokens, then eos), in one
    # window; ASCII, so each character is one byte.
    text = "def add(a, b):\n    return a + b\n"
    (tmp_path / "notes.txt").write_text(text)
    ids = tokenizer.encode(text).ids + [special_ids(tokenizer)["eos"]]
    window = len(ids) - 1
    assert main(["eval", str(run), "--data", str(tmp_path / "notes.txt"), "--seq-len", str(window),
                 "--device", "cpu"]) == 0  # fmt: skip
    on_text = json.loads(capsys.readouterr().out)
    with torch.no_grad():
        want = F.cross_entropy(model(torch.tensor([ids[:-1]]))[0], torch.tensor(ids[1:])).item()
    assert (on_text["tokens"], on_text["windows"], on_text["seq_len"]) == (window, 1, window)
    assert on_text["loss"] == pytest.approx(want, rel=1e-5)
    assert on_text["ppl"] == pytest.approx(math.exp(want), rel=1e-5)
    predicted_bytes = len(text.encode()) - len(
        tokenizer.decode([ids[0]]).encode()
    )  # the first token is no target
    assert on_text["bits_per_byte"] == pytest.approx(
        want * window / (predicted_bytes * math.log(2)), rel=1e-5
    )
    assert main(["eval", str(run), "--data", str(tmp_path / "absent.txt")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("lmforge: error: ") and "absent.txt" in error, error

    # `import lmforge; lmforge.load(RUN)` reads the run-directory format only: no trainer, no
    # parallel layouts, no pipelining (a fresh interpreter, so nothing is imported already).
    probe = ("import sys, lmforge; lmforge.load(sys.argv[1]); print(sorted(m for m in sys.modules if m.startswith("
             "('lmforge.train', 'lmforge.parallel', 'lmforge.bench', 'torch.distributed.pipelining'))))")  # fmt: skip
    loaded = subprocess.run(
        [sys.executable, "-c", probe, str(run)], capture_output=True, text=True, timeout=120
    )
    assert loaded.returncode == 0 and loaded.stdout.strip() == "[]", loaded.stdout + loaded.stderr[-2000:]

    # --resume without --config reads RUN/config.yaml; the override extends the run.
    assert (
        main(["pretrain", "--out", str(run), "--resume", "--train.max_steps=6", "--logging.progress=false"])
        == 0
    )
    assert (run / "checkpoints" / "step_0000006").is_dir()


def test_resume_auto_without_a_config_is_refused(tmp_path, capsys):
    """`--resume auto` reads RUN/config.yaml like `--resume`; on a run that has none it would start
    from the defaults, so it needs --config (examples/slurm.sbatch passes both)."""
    for resume in (["--resume", "auto"], ["--resume=auto"]):
        assert main(["pretrain", "--out", str(tmp_path / "new"), *resume]) == 2
        [line] = capsys.readouterr().err.splitlines()
        assert line.startswith("lmforge: error: --resume auto") and "pass --config" in line, line
    assert not (tmp_path / "new").exists()


def test_data_prepare(corpus_dir, tmp_path, capsys):
    out = tmp_path / "data"
    assert (
        main(["data", "prepare", "--source", str(corpus_dir), "--out", str(out), "--vocab-size", "300"]) == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert (out / "manifest.json").is_file() and (out / "tokenizer.json").is_file()
    assert summary["vocab_size"] == 300


def test_bench_prints_one_json_line(capsys):
    args = ["bench", "--family", "gpt2", "--flavor", "debug", "--batch-size", "2", "--seq-len", "32",
            "--steps", "2", "--warmup", "1"]  # fmt: skip
    assert main(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert result["tokens_per_sec"] > 0 and result["step_ms"] > 0
    assert {"mfu", "peak_mem_gib", "mfu_peak"} <= set(result)


def test_bench_switches_and_profile(capsys, tmp_path):
    trace = tmp_path / "trace.json"
    args = ["bench", "--family", "llama", "--flavor", "debug", "--batch-size", "2", "--seq-len", "32",
            "--steps", "2", "--warmup", "1", "--fused-projections", "true", "--optimizer", "muon",
            "--activation-checkpointing", "full", "--profile", str(trace)]  # fmt: skip
    assert main(args) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert result["fused_projections"] is True and result["optimizer"] == "muon"
    assert result["activation_checkpointing"] == "full" and result["compile"] is False
    # The trace has the step's ops; the table names the top ones (the matmuls among them).
    events = json.loads(trace.read_text())["traceEvents"]
    assert any(e.get("name") == "aten::mm" for e in events)
    assert "Self CPU" in captured.err and "aten::mm" in captured.err


def test_bench_layouts_time_the_same_training(capsys):
    """--layout fsdp and pipeline wrap the model on a process group of this one process: the same
    weights and tokens as the plain model, so the same losses (in fp32, which auto would not pick on
    a CPU with native bf16); only the time differs."""
    base = ["bench", "--family", "llama", "--flavor", "debug", "--batch-size", "4", "--seq-len", "32",
            "--steps", "3", "--warmup", "1", "--device", "cpu", "--precision", "fp32"]  # fmt: skip
    pipeline = ["--layout", "pipeline", "--microbatches", "2", "--pp-schedule"]
    runs = {
        "plain": [],
        "accumulation": ["--microbatches", "2", "--fused-loss", "false"],
        "fsdp": ["--layout", "fsdp"],
        "fsdp-keep-gathered": [
            "--layout",
            "fsdp",
            "--fsdp-reshard-after-forward",
            "false",
            "--microbatches",
            "2",
        ],
        "gpipe": pipeline + ["gpipe"],
        "1f1b": pipeline + ["1f1b"],
        # torch 2.11 cannot run interleaved 1F1B's two stages on one process: bench refuses it there.
        **({"interleaved": pipeline + ["interleaved_1f1b"]} if interleaving_on_one_process() else {}),
        "other seed": ["--seed", "1"],
    }
    results = {}
    for name, extra in runs.items():
        assert main(base + extra) == 0, name
        results[name] = json.loads(capsys.readouterr().out)
    # What each layout made of the debug model's 2 blocks (FSDP2: one unit per block, and the root):
    assert results["plain"]["wrapped"] == results["accumulation"]["wrapped"] == "not wrapped"
    assert results["fsdp"]["wrapped"] == results["fsdp-keep-gathered"]["wrapped"] == "3 FSDP2 units"
    one_stage = "1 pipeline stage(s) on this process, layers 0+1"
    assert results["gpipe"]["wrapped"] == results["1f1b"]["wrapped"] == one_stage
    if "interleaved" in results:
        assert results["interleaved"]["wrapped"] == "2 pipeline stage(s) on this process, layers 0 | 1"
        assert results["interleaved"]["layout"] == "pipeline interleaved_1f1b"
    assert results["gpipe"]["fused_loss"] is False
    reference = results.pop("plain")["loss"]
    other_seed = results.pop("other seed")["loss"]
    assert other_seed != pytest.approx(reference, rel=1e-3)  # the loss tells runs apart
    for name, result in results.items():  # a pipeline that skipped a layer would be ~1e-5 off
        assert result["loss"] == pytest.approx(reference, rel=1e-6), name
        assert result["tokens_per_sec"] > 0
    assert not torch.distributed.is_initialized()  # bench's own process group is gone


DEBUG_PRETRAIN = ["pretrain", "--config", str(RECIPES / "debug.yaml"), "--out", "x"]


@pytest.mark.parametrize(
    ("args", "names"),
    [
        ([*DEBUG_PRETRAIN, "--train.max_step=3"], ["max_step"]),
        ([*DEBUG_PRETRAIN, "--train.max_steps=abc"], ["train.max_steps", "abc"]),
        ([*DEBUG_PRETRAIN, "--optim.lr=fast"], ["optim.lr", "fast"]),
        ([*DEBUG_PRETRAIN, "--train.precision=fp64"], ["train.precision", "fp64"]),
        ([*DEBUG_PRETRAIN, "--resume=sometimes"], ["--resume", "sometimes"]),
        (["pretrain", "--out", "does/not/exist", "--resume"], ["does not exist"]),
        (["generate", "does/not/exist"], ["does not exist"]),
        (["generate", "does/not/exist", "--max-new-tokens", "abc"], ["max_new_tokens", "abc"]),
        (["generate", "does/not/exist", "--nope", "1"], ["--nope"]),
        (["data", "prepare", "--source", "no/such/corpus", "--out", "x"], ["no/such/corpus"]),
        (["bench", "--flavor", "debug", "--batch-size", "abc"], ["batch_size", "abc"]),
        (["bench", "--flavor", "debug", "--compile", "maybe"], ["compile", "maybe"]),
        (["bench", "--flavor", "debug", "--batch-size", "4", "--microbatches", "3"], ["microbatches=3"]),
        (["bench", "--flavor", "debug", "--steps=-1"], ["--steps", "-1"]),
        (["bench", "--flavor", "debug", "--layout", "pipeline", "--compile", "true"], ["--compile true"]),
        (
            ["bench", "--family", "llama", "--flavor", "debug", "--layout", "fsdp", "--optimizer", "muon"],
            ["muon"],
        ),
    ],
)
def test_user_errors_are_one_line(args, names, tmp_path):
    assert_one_line_error(run_cli(*args, cwd=tmp_path), *names)


def test_help():
    result = run_cli("pretrain", "--help")
    assert result.returncode == 0
    assert "--train.max_steps" in result.stdout and "--resume" in result.stdout


def test_corrupt_shard_and_empty_corpus_are_one_line_errors(prepared_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(prepared_dir, data)
    shard = data / "train_000.bin"
    shard.write_bytes(shard.read_bytes()[:-10])
    result = run_cli(*debug_args(data, tmp_path / "run"), cwd=tmp_path)
    assert_one_line_error(result, "train_000.bin")

    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_cli("data", "prepare", "--source", str(empty), "--out", str(tmp_path / "d"), cwd=tmp_path)
    assert_one_line_error(result, str(empty))
    assert not (tmp_path / "d" / "manifest.json").exists()

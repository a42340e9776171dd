"""Post-training quantization (lmforge.compress.quantize): every CPU scheme through the CLI, its
artifact reloaded in a fresh process, and the errors of artifacts that cannot be used."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file, save_file
from torch.profiler import profile

from lmforge.api import load
from lmforge.cli import main
from lmforge.compress.quantize import (
    INT4PACK_MAX_ROWS,
    INT8_REDUCE_MAX_ROWS,
    INT8PACK_MAX_ROWS,
    Int4WeightOnlyLinear,
    Int8DynamicLinear,
    Int8WeightOnlyLinear,
    QuantizedEmbedding,
    _quantize_activations,
    artifact_tensors,
    pack_int4,
    quantize_checkpoint,
    quantize_model,
    unpack_int4,
)
from lmforge.config import load_config
from lmforge.errors import CheckpointError, ConfigError
from lmforge.infer.generate import DecodeBatch, generate
from lmforge.models import build_model, model_config
from lmforge.rundir import MANIFEST, decode_precision, latest_checkpoint, run_precision, sha256_file
from lmforge.runtime import cpu_native_bf16
from lmforge.train.pretrain import pretrain

CPU_SCHEMES = ["int8-weight", "int8-dynamic", "int4-weight"]
# Quantized logits against fp32, relative (Frobenius) error: int8 rounds to 1/255 of each row's
# range, int4 to 1/15 of each group's. Bytes on disk as a fraction of the fp32 checkpoint's.
MAX_ERROR = {"int8-weight": 0.02, "int8-dynamic": 0.03, "int4-weight": 0.15}
MAX_BYTES = {"int8-weight": 0.3, "int8-dynamic": 0.3, "int4-weight": 0.18}


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, session_debug_config) -> Path:
    out = tmp_path_factory.mktemp("base") / "run"
    quiet = {"progress": False, "tensorboard": False, "plot": False}
    pretrain(
        session_debug_config(train={"max_steps": 6, "eval_every": 0, "sample_tokens": 0}, logging=quiet), out
    )
    return out


@pytest.fixture(scope="module")
def artifacts(base_run, tmp_path_factory, logits_in_a_fresh_process) -> dict[str, Path]:
    """Each CPU scheme's artifact, written by `lmforge compress quantize`, and its logits of ids() as
    one fresh process reloads them all (OUT.logits.safetensors)."""
    root = tmp_path_factory.mktemp("quantized")
    outs = {}
    for scheme in CPU_SCHEMES:
        outs[scheme] = root / scheme
        assert (
            main(["compress", "quantize", str(base_run), "--scheme", scheme, "--out", str(outs[scheme])]) == 0
        )
    logits_in_a_fresh_process(list(outs.values()), ids())
    return outs


def ids() -> torch.Tensor:
    return torch.arange(24).reshape(2, 12) * 7 % 500  # (2, 12)


def weight_bytes(run: Path) -> int:
    return sum(f.stat().st_size for f in (latest_checkpoint(run) / "model").glob("*.safetensors"))


@pytest.mark.parametrize("scheme", CPU_SCHEMES)
def test_artifact_reloads_in_a_fresh_process_with_the_same_logits(scheme, artifacts, base_run):
    in_memory, cfg = quantize_checkpoint(latest_checkpoint(base_run), scheme)
    with torch.no_grad():
        expected = in_memory(ids())
        fp32 = load(base_run)[0](ids())
    reloaded = load_file(f"{artifacts[scheme]}.logits.safetensors")["logits"]
    torch.testing.assert_close(reloaded, expected, rtol=0, atol=1e-6)
    error = ((expected - fp32).norm() / fp32.norm()).item()
    assert 0 < error < MAX_ERROR[scheme], error  # quantized (not the fp32 weights), and close to them
    assert weight_bytes(artifacts[scheme]) <= MAX_BYTES[scheme] * weight_bytes(base_run)
    saved = load_config(artifacts[scheme] / "config.yaml").compress
    assert (saved.quantize, saved.group_size) == (scheme, 32 if scheme == "int4-weight" else None)
    assert saved.source == str(latest_checkpoint(base_run).resolve()) and cfg.compress == saved


@pytest.mark.parametrize("scheme", CPU_SCHEMES)
def test_generate_and_eval_run_on_the_artifact(scheme, artifacts, capsys):
    assert main(["generate", str(artifacts[scheme]), "--max-new-tokens", "4", "--seed", "0"]) == 0
    assert main(["eval", str(artifacts[scheme]), "--batches", "4"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0 < result["val_loss"] < 7.0  # ln(512) = 6.2: a model, not noise


def one_error_line(capsys) -> str:
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("lmforge: error: "), error
    return error


def test_a_corrupted_artifact_is_one_error_line(artifacts, tmp_path, capsys):
    out = tmp_path / "corrupt"
    shutil.copytree(artifacts["int8-weight"], out)
    weights = latest_checkpoint(out) / "model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF  # a byte of the last tensor's values
    weights.write_bytes(bytes(data))
    assert main(["eval", str(out)]) == 2
    assert "corrupt" in one_error_line(capsys)


def remanifest(ckpt: Path) -> None:
    """Rewrite the manifest after a deliberate change: the checksums pass, the contents do not."""
    manifest = json.loads((ckpt / MANIFEST).read_text())
    manifest["files"] = {
        str(p.relative_to(ckpt)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(ckpt.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    (ckpt / MANIFEST).write_text(json.dumps(manifest))


def tamper(artifact: Path, out: Path, change) -> Path:
    shutil.copytree(artifact, out)
    ckpt = latest_checkpoint(out)
    weights = ckpt / "model" / "model.safetensors"
    tensors = load_file(weights)
    change(tensors)
    save_file(tensors, str(weights))
    remanifest(ckpt)
    return out


def test_mismatched_artifacts_are_refused_naming_the_tensor(artifacts, tmp_path):
    name = "layers.0.attention.wq.weight"
    # The config says int8-weight, the tensors are int4-weight's.
    other = tmp_path / "other"
    shutil.copytree(artifacts["int8-weight"], other)
    ckpt = latest_checkpoint(other)
    shutil.copyfile(
        latest_checkpoint(artifacts["int4-weight"]) / "model" / "model.safetensors",
        ckpt / "model" / "model.safetensors",
    )
    remanifest(ckpt)
    with pytest.raises(CheckpointError, match=r"tensor '.*' is .*int8-weight makes it"):
        load(other)
    missing = tamper(artifacts["int8-weight"], tmp_path / "missing", lambda t: t.pop(f"{name}.scale"))
    with pytest.raises(CheckpointError, match=rf"tensor '{name}.scale' of scheme int8-weight is missing"):
        load(missing)

    def reshape(tensors):
        tensors[f"{name}.qdata"] = tensors[f"{name}.qdata"][:, :32].contiguous()

    with pytest.raises(
        CheckpointError, match=rf"'{name}.qdata' is I8 \[64, 32\], scheme int8-weight makes it I8 \[64, 64\]"
    ):
        load(tamper(artifacts["int8-weight"], tmp_path / "shape", reshape))
    extra = tamper(artifacts["int8-weight"], tmp_path / "extra", lambda t: t.update(stowaway=torch.zeros(2)))
    with pytest.raises(CheckpointError, match="holds tensor 'stowaway'"):
        load(extra)


def test_float8_on_a_cpu_is_one_error_line_at_quantize_and_at_load(base_run, artifacts, tmp_path, capsys):
    assert (
        main(
            [
                "compress",
                "quantize",
                str(base_run),
                "--scheme",
                "float8-weight",
                "--out",
                str(tmp_path / "f8"),
            ]
        )
        == 2
    )
    assert "float8-weight needs a CUDA GPU" in one_error_line(capsys)
    assert not (tmp_path / "f8").exists()
    # An artifact that says float8-weight (as one written on a GPU would), loaded on this CPU.
    out = tmp_path / "f8-artifact"
    shutil.copytree(artifacts["int8-weight"], out)
    ckpt = latest_checkpoint(out)
    cfg = yaml.safe_load((ckpt / "config.yaml").read_text())
    cfg["compress"]["quantize"] = "float8-weight"
    (ckpt / "config.yaml").write_text(yaml.safe_dump(cfg))
    remanifest(ckpt)
    assert main(["generate", str(out), "--max-new-tokens", "2"]) == 2
    assert "float8-weight needs a CUDA GPU" in one_error_line(capsys)


def test_refusals(base_run, artifacts, debug_config, tmp_path, capsys):
    for argv, words in [
        (
            ["compress", "quantize", str(artifacts["int8-weight"]), "--scheme", "int4-weight"],
            "already quantized",
        ),
        (
            ["compress", "quantize", str(base_run), "--scheme", "int4-weight", "--group-size", "48"],
            "--group-size",
        ),
        (
            ["compress", "quantize", str(base_run), "--scheme", "int8-weight", "--group-size", "32"],
            "is for int4-weight",
        ),
        (["export", str(artifacts["int8-weight"]), "--format", "hf"], "it is quantized"),
    ]:
        assert main([*argv, "--out", str(tmp_path / "x")] if argv[0] == "compress" else argv) == 2
        assert words in one_error_line(capsys)
    quiet = {"progress": False, "tensorboard": False, "plot": False}
    train = {"max_steps": 2, "eval_every": 0, "sample_tokens": 0, "init": str(artifacts["int4-weight"])}
    with pytest.raises(ConfigError, match="train.init.*is quantized \\(int4-weight\\)"):
        pretrain(debug_config(train=train, logging=quiet), tmp_path / "ft")


def test_int4_packing_round_trips():
    values = torch.randint(-8, 8, (6, 32), dtype=torch.int8)
    packed = pack_int4(values)
    assert packed.dtype == torch.uint8 and packed.shape == (6, 16)
    assert torch.equal(unpack_int4(packed), values)


@pytest.mark.parametrize("scheme", CPU_SCHEMES)
def test_a_tied_model_keeps_one_quantized_table(scheme):
    torch.manual_seed(0)
    model = build_model(model_config("gpt2", "debug")).eval()
    idx = ids()
    with torch.no_grad():
        fp32 = model(idx)
        quantize_model(model, scheme, 32 if scheme == "int4-weight" else None)
        logits = model(idx)
    assert model.wte.weight is model.lm_head.weight and isinstance(model.wte, QuantizedEmbedding)
    assert not any(name.startswith("lm_head.") for name in artifact_tensors(model))  # stored once
    assert ((logits - fp32).norm() / fp32.norm()).item() < MAX_ERROR[scheme]
    # The row lookup dequantizes exactly as torchao's whole-table dequantize does.
    table = model.wte.weight
    torch.testing.assert_close(model.wte(idx), F.embedding(idx, table.dequantize()), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("scheme", "kernel_class", "kernel", "max_rows"),
    [
        ("int8-weight", Int8WeightOnlyLinear, "aten::_weight_int8pack_mm", INT8PACK_MAX_ROWS),
        ("int4-weight", Int4WeightOnlyLinear, "aten::_weight_int4pack_mm_for_cpu", INT4PACK_MAX_ROWS),
    ],
)
def test_weight_only_linears_use_the_cpu_kernels_for_few_rows_in_bf16(scheme, kernel_class, kernel, max_rows):
    torch.manual_seed(0)
    model = build_model(model_config("llama", "debug")).eval()
    quantize_model(model, scheme, 32 if scheme == "int4-weight" else None)
    layer = model.layers["0"].feed_forward.w1
    assert isinstance(layer, kernel_class)

    def run(x: torch.Tensor) -> tuple[torch.Tensor, set[str]]:
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16), profile() as prof:
            y = layer(x)
        return y, {e.key for e in prof.key_averages()}

    x = torch.randn(1, 3, 64)
    reference = x.bfloat16() @ layer.weight.dequantize().bfloat16().t()  # (1, 3, 256)
    fast, few_rows = run(x)
    batched, many_rows = run(x.repeat(1, max_rows, 1))  # more rows than the kernel is fast for: torchao's
    assert kernel in few_rows and kernel not in many_rows
    assert fast.dtype == torch.bfloat16 == batched.dtype
    torch.testing.assert_close(fast, reference, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(batched[:, :3], reference, rtol=2e-2, atol=2e-2)
    with torch.no_grad():  # values copied in place (the load path): the kernel's copy follows
        layer.weight.qdata.copy_(-layer.weight.qdata.clamp(min=-7))
    torch.testing.assert_close(
        run(x)[0], x.bfloat16() @ layer.weight.dequantize().bfloat16().t(), rtol=2e-2, atol=2e-2
    )


def test_int8_weight_linear_compiles_whole_reading_the_int8_weight():
    """Inside a compiled step, int8-weight's CPU linear is traced (no graph break, `fullgraph`), never
    calls PyTorch's int8 kernel, and gives the dequantized weight's product: few rows by the
    multiply-and-sum, more by the matmul of the converted weight, in fp32 and under bf16 autocast."""
    torch.manual_seed(0)
    model = build_model(model_config("llama", "debug")).eval()
    quantize_model(model, "int8-weight")
    assert not any(getattr(m, "eager_under_compile", False) for m in model.modules())
    layer = model.layers["0"].feed_forward.w1
    layer.bias = torch.nn.Parameter(torch.randn(layer.out_features))  # the bias path too
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    dequantized = layer.weight.dequantize()
    for rows in (1, INT8_REDUCE_MAX_ROWS, INT8_REDUCE_MAX_ROWS + 1):
        x = torch.randn(1, rows, 64)
        reference = F.linear(x, dequantized, layer.bias)
        with torch.no_grad(), profile() as prof:
            y = compiled(x)
        assert "aten::_weight_int8pack_mm" not in {e.key for e in prof.key_averages()}
        torch.testing.assert_close(y, reference, rtol=1e-5, atol=1e-5)
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
            y = compiled(x)
        assert y.dtype == torch.bfloat16
        torch.testing.assert_close(y.float(), reference, rtol=2e-2, atol=2e-2)


def test_decode_precision_of_quantized_runs(artifacts, tmp_path):
    """One prompt on a CPU: int8-dynamic in fp32; the weight-only schemes in the run's precision,
    except int8-weight compiled (its compiled step reads the int8 weight in fp32)."""
    cpu = torch.device("cpu")
    for scheme, out in artifacts.items():
        config = yaml.safe_load((latest_checkpoint(out) / "config.yaml").read_text())
        config["train"]["precision"] = "bf16"  # a run trained in bf16: bf16 on a CPU that has it
        ckpt = tmp_path / scheme
        ckpt.mkdir()
        (ckpt / "config.yaml").write_text(yaml.safe_dump(config))
        run = run_precision(ckpt, cpu)
        assert decode_precision(ckpt, cpu) == (torch.float32 if scheme == "int8-dynamic" else run)
        assert decode_precision(ckpt, cpu, compiled=True) == (
            run if scheme == "int4-weight" else torch.float32
        )
    assert run == torch.bfloat16 or not cpu_native_bf16()


def test_int8_dynamic_linear_multiplies_int8_values_as_torchao_does():
    """The CPU path (torch._int_mm, the zero points taken off in int32, the row sums cached) gives
    torchao's own linear's outputs, also after the values change in place (the load path's copy)."""
    torch.manual_seed(0)
    model = build_model(model_config("llama", "debug")).eval()
    quantize_model(model, "int8-dynamic")
    layer = model.layers["0"].feed_forward.w1
    assert isinstance(layer, Int8DynamicLinear)
    x = torch.randn(2, 5, 64) + 0.3  # off-centre: the activations' zero points are not 0
    with torch.no_grad(), profile() as prof:
        fast = layer(x)
    assert "aten::_int_mm" in {e.key for e in prof.key_averages()}
    with torch.no_grad():
        torch.testing.assert_close(fast, F.linear(x, layer.weight), rtol=1e-5, atol=1e-5)  # torchao's
        layer.weight.qdata.copy_(-layer.weight.qdata.clamp(min=-127))
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight), rtol=1e-5, atol=1e-5)
    # The activations' quantization (lmforge's fp32 formulas) is torchao's, bit for bit.
    from torchao.quantization.quantize_.common import _choose_quant_func_and_quantize_tensor

    rows = torch.cat([x.reshape(-1, 64), torch.zeros(1, 64), torch.full((1, 64), 5.0)])  # and an all-0 row
    theirs = _choose_quant_func_and_quantize_tensor(rows, layer.weight.act_quant_kwargs)
    ours = _quantize_activations(rows, layer.weight.act_quant_kwargs)
    for got, want in zip(ours, (theirs.qdata, theirs.scale, theirs.zero_point), strict=True):
        assert torch.equal(got, want)


def test_quantized_models_decode_compiled_as_they_do_eagerly():
    """`generate --compile`: int8-dynamic's and int4's linears run eagerly inside the compiled step
    (inductor cannot lower their kernels' calls), int8-weight's compiles; the greedy tokens are the
    eager ones."""
    torch.manual_seed(0)
    base = build_model(model_config("llama", "debug")).eval()
    for scheme in ("int8-weight", "int8-dynamic", "int4-weight"):
        model = quantize_model(copy.deepcopy(base), scheme, 32 if scheme == "int4-weight" else None)
        # as decode_precision gives eagerly, and compiled (int8-weight's compiled step: fp32)
        dtypes = [torch.float32] if scheme == "int8-dynamic" else [torch.bfloat16]
        dtypes += [torch.float32] if scheme == "int8-weight" else []
        for dtype in dtypes:
            eager = list(generate(model, list(range(8)), 4, temperature=0, dtype=dtype))
            assert list(generate(model, list(range(8)), 4, temperature=0, dtype=dtype, compile=True)) == eager
    # The unquantized model decoded after them runs its own whole graph, not their broken one (which
    # would call the linears eagerly: aten::mm); the step's first call compiles it.
    with DecodeBatch(base, 1, 16, compile=True) as batch:
        batch.prefill_row(0, list(range(8)))
        batch.decode_step(torch.tensor([[3]]))
        with profile() as prof:
            batch.decode_step(torch.tensor([[4]]))
    ops = {e.key for e in prof.key_averages()}
    assert not ops & {"aten::mm", "aten::addmm", "aten::linear"}, ops

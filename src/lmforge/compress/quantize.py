"""Post-training quantization with torchao: an offline transform that writes a run directory, and the
load path that rebuilds the quantized modules from it (`lmforge compress quantize`, `lmforge.load`).

The schemes (torchao's `quantize_` with its config classes, on the token embedding, every linear
layer inside the blocks and the output head; a classifier head and position embeddings stay as
they are):

    int8-weight    Int8WeightOnlyConfig: int8 weights, one scale per output channel
    int8-dynamic   Int8DynamicActivationInt8WeightConfig: the same weights, and each token's
                   activations quantized to int8 in the forward (integer matmuls)
    int4-weight    IntxWeightOnlyConfig(int4, PerGroup(g)): 4-bit weights, one scale per group of g
                   inputs, chosen by HQQ (Badri & Shaji 2023: scales that minimise the weights' error,
                   no calibration data); the blocks of a QAT run of this scheme get the plain
                   min-max scales its fake quantizer trained against
    float8-weight  Float8WeightOnlyConfig: float8 e4m3 weights, one scale per output channel; needs a
                   CUDA GPU of compute capability >= 8.9

The token embedding is quantized as a table (IntxWeightOnlyConfig: int8 rows for the int8 schemes,
int4 groups for int4-weight; float8-weight leaves it as it is) and read row by row
(`QuantizedEmbedding`): torchao's embedding dequantizes the whole table at every lookup. A tied
embedding and head keep sharing one quantized tensor.

The artifact (`quantize_run`) is a run directory like any other: OUT/config.yaml (the source's, with
`compress.quantize`, `compress.group_size`, `compress.source` set), OUT/tokenizer.json and
OUT/checkpoints/step_N/ with its manifest (lmforge.rundir verifies it). Its model/model.safetensors
holds, for each quantized weight NAME, the plain tensors inside torchao's tensor subclass as
PyTorch's subclass protocol names them (`__tensor_flatten__`: NAME.qdata, NAME.scale, ...), int4
values packed two to a byte; every other weight under its usual name. What the tensors mean (which
subclass, its block size) comes from config.yaml's scheme alone: the load path (`load_quantized`)
quantizes the freshly built model with the same config, checks that the file holds exactly the
tensors that gives, by name, shape and dtype, then copies them in. Nothing in a weights file decides
which classes are built, and nothing is unpickled.

Speed on CPU (benchmarks/quantize_bench.py): torchao's eager weight-only matmuls convert the whole
weight to the activations' dtype at every call (int4: dequantize it), slower than fp32 when decoding
one token. PyTorch ships CPU kernels that read the quantized weight directly, `aten._weight_int8pack_mm`
and tinygemm's `aten._weight_int4pack_mm_for_cpu` (on a packed copy of the int4 weight); with bf16
activations they are 2.4x (int8) and 2x (int4) faster than an fp32 matmul for one token, with fp32
activations several times slower, and for many rows a bf16 matmul of the converted weight wins
(measured on a Xeon with AMX, K=768, N=2304: INT8PACK_MAX_ROWS, INT4PACK_MAX_ROWS).
`Int8WeightOnlyLinear` and `Int4WeightOnlyLinear` pick between them. They compute in the autocast
dtype the run's precision gives (bf16 on a CPU with native bf16), never in a dtype of their own: a
weight-only model is fast where its run computes in bf16; in fp32 it computes exactly, slowly.
Inside a compiled decode step int8-weight needs no kernel of PyTorch's: a multiply-and-sum over the
int8 weight, which inductor writes as one vectorised loop, reads the weights several times faster
than `_weight_int8pack_mm` (measured, 40 layers 768 -> 3072, one row, 2 threads: 2.4 ms against 5.9,
fp32 matmul 14.2), so a compiled int8-weight model decodes fastest in fp32 (rundir.decode_precision).
`Int8DynamicLinear` multiplies int8-dynamic's int8 activations and weights with `torch._int_mm`
(2.3x an fp32 matmul for 1024 rows) and computes in the activations' dtype, as torchao's linear.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from lmforge.adapt.lora import merge_lora
from lmforge.config import CompressConfig, LoraConfig, RunConfig, config_sha256, load_config, to_dict
from lmforge.errors import CheckpointError, ConfigError
from lmforge.models import FamilyModel, spec_of
from lmforge.rundir import (
    FORMAT_VERSION,
    MANIFEST,
    checkpoint_name,
    data_dir_for,
    load_model_weights,
    meta_model,
    read_manifest,
    sha256_file,
)
from lmforge.runtime import quiet_torchao, require_float8_gpu

SCHEMES = ("int8-weight", "int8-dynamic", "int4-weight", "float8-weight")
GROUP_SIZES = (16, 32, 64, 128, 256)  # int4-weight: those of QatConfig
DEFAULT_GROUP_SIZE = 32
WEIGHTS_FILE = "model.safetensors"
INT4: torch.dtype = torch.int4  # type: ignore[attr-defined]  # torch's type stubs lack the sub-byte dtypes

# `aten._weight_int8pack_mm` beats a bf16 matmul of the converted weight up to about this many rows
# (measured: 1 row 127 vs 727 us, 4 rows 230 vs 781, 16 rows 808 vs 768; K=768, N=2304, one thread).
INT8PACK_MAX_ROWS = 8
# Inside a compiled step, the multiply-and-sum over the int8 weight beats a matmul of the converted
# weight up to about this many rows (measured, 40 layers 768 -> 3072, 2 threads: 1 row 2.4 vs 17.8
# ms (fp32's matmul 15.0), 8 rows 17.6 vs 31.7, 16 rows 34.4 vs 37.0; it reads the weight once a row).
INT8_REDUCE_MAX_ROWS = 8
# The int4 kernel (tinygemm) up to about this many rows, against torchao's dequantize and a bf16 matmul
# (measured: 1 row 145 vs 4760 us, 64 rows 3042 vs 6081, 256 rows 11588 vs 7223; same shape).
INT4PACK_MAX_ROWS = 128

_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int8: "I8",
                       torch.uint8: "U8", torch.int32: "I32", torch.int64: "I64",
                       torch.float8_e4m3fn: "F8_E4M3"}  # fmt: skip


# ---------------------------------------------------------------------------- torchao


def _torchao():
    """The torchao.quantization module (imported on first use: `import lmforge` stays light)."""
    try:
        with quiet_torchao():
            import torchao.quantization as quantization
    except ImportError:
        raise ConfigError("quantization needs torchao: pip install 'torchao>=0.18'") from None
    return quantization


def linear_config(scheme: str, group_size: int | None, hqq: bool = False):
    """The torchao config that quantizes the linear layers for `scheme`. (lmforge.train.qat builds the
    same int4-weight config for its fake quantizer; tests/train/test_qat.py checks that they agree.)"""
    ao = _torchao()
    # set_inductor_config=False: torchao would otherwise change torch._inductor's global config.
    if scheme == "int8-weight":
        return ao.Int8WeightOnlyConfig(set_inductor_config=False)
    if scheme == "int8-dynamic":
        # Asymmetric per-token activations: what torchao's QAT fake-quantizes (lmforge.train.qat).
        return ao.Int8DynamicActivationInt8WeightConfig(
            act_mapping_type=ao.MappingType.ASYMMETRIC, set_inductor_config=False
        )
    if scheme == "int4-weight":
        return _int4_config(group_size or DEFAULT_GROUP_SIZE, hqq)
    if scheme == "float8-weight":
        return ao.Float8WeightOnlyConfig(set_inductor_config=False)
    raise ConfigError(f"unknown quantization scheme '{scheme}' (expected one of {', '.join(SCHEMES)})")


def _int4_config(group_size: int, hqq: bool):
    ao = _torchao()
    from torchao.quantization.quantize_.workflows.intx.intx_choose_qparams_algorithm import (
        IntxChooseQParamsAlgorithm,
    )

    algorithm = IntxChooseQParamsAlgorithm.HQQ_SCALE_ONLY if hqq else IntxChooseQParamsAlgorithm.AFFINE
    return ao.IntxWeightOnlyConfig(
        weight_dtype=INT4, granularity=ao.PerGroup(group_size), intx_choose_qparams_algorithm=algorithm
    )


def _embedding_config(scheme: str, group_size: int | None, hqq: bool):
    """The config of the token embedding's table, or None where it stays as it is (float8-weight)."""
    ao = _torchao()
    if scheme in ("int8-weight", "int8-dynamic"):  # one scale per row
        return ao.IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=ao.PerAxis(0))
    if scheme == "int4-weight":
        return _int4_config(group_size or DEFAULT_GROUP_SIZE, hqq)
    return None


def check_device(scheme: str, device: torch.device) -> None:
    """ConfigError (one line) unless this device runs `scheme`."""
    if scheme not in SCHEMES:
        raise ConfigError(f"unknown quantization scheme '{scheme}' (expected one of {', '.join(SCHEMES)})")
    if scheme == "float8-weight":  # the int8 and int4 schemes run on a CPU and on any GPU
        require_float8_gpu(device, "quantization scheme float8-weight")


# ---------------------------------------------------------------------------- the quantized modules


def _compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype a matmul on `x` computes in: autocast's where it is on, else x's own."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _eager_under_compile(forward):
    """A quantized linear's kernel call runs eagerly inside a compiled model (`generate --compile`: the
    rest of the step compiles around it, lmforge.infer.generate.compiled_decode_one_token). Inductor
    cannot lower these kernels' calls (a bf16 input it has not materialised trips an assertion in its
    int8pack_mm lowering; the caches keyed by tensor versions are data-dependent branches; torch 2.13)."""
    return torch.compiler.disable(forward, recursive=True)


class Int8WeightOnlyLinear(nn.Linear):
    """nn.Linear whose weight is torchao's Int8Tensor (int8 (out, in), scale (out, 1)). On a CPU,
    eagerly: PyTorch's int8-weight kernel for a few rows in bf16 or fp16 (see the module docstring),
    else torchao's matmul. On a CPU inside a compiled step (`generate --compile`): for a few rows, a
    multiply-and-sum over the int8 weight in fp32 that inductor turns into one loop reading each
    weight byte once (under a backend other than inductor it materialises the product: fine for
    tests, not for speed); for more rows, a matmul of the converted weight. Elsewhere torchao's
    matmul, run eagerly inside a compiled step as before."""

    @property
    def eager_under_compile(self) -> bool:  # see _eager_under_compile: off a CPU torchao's matmul
        return self.weight.device.type != "cpu"

    def forward(self, x: Tensor) -> Tensor:
        # x: (..., in_features) -> (..., out_features) in the compute dtype (as autocast's linear)
        dtype = _compute_dtype(x)
        if x.device.type == "cpu" and torch.compiler.is_compiling():
            return self._compiled_cpu_forward(x, dtype)
        return self._eager_forward(x, dtype)

    def _compiled_cpu_forward(self, x: Tensor, dtype: torch.dtype) -> Tensor:
        weight: Any = self.weight  # torchao's Int8Tensor
        scale = weight.scale.reshape(-1)
        if x.numel() // x.shape[-1] <= INT8_REDUCE_MAX_ROWS:
            # (..., 1, in) * (out, in) summed over in: never materialised by inductor, one pass
            y = (x.unsqueeze(-2).float() * weight.qdata.float()).sum(-1) * scale.float()
        else:
            y = F.linear(x.to(dtype), weight.qdata.to(dtype)) * scale.to(dtype)
        y = y.to(dtype)
        return y if self.bias is None else y + self.bias.to(dtype)

    @_eager_under_compile
    def _eager_forward(self, x: Tensor, dtype: torch.dtype) -> Tensor:
        rows = x.numel() // x.shape[-1]
        weight: Any = self.weight  # torchao's Int8Tensor
        if x.device.type != "cpu" or dtype == torch.float32 or rows > INT8PACK_MAX_ROWS:
            return F.linear(x.to(dtype), weight, None if self.bias is None else self.bias.to(dtype))
        y = torch.ops.aten._weight_int8pack_mm(
            x.reshape(rows, -1).to(dtype), weight.qdata, weight.scale.reshape(-1).to(dtype)
        )  # (rows, out_features)
        y = y.reshape(*x.shape[:-1], -1)
        return y if self.bias is None else y + self.bias.to(dtype)


class Int8DynamicLinear(nn.Linear):
    """nn.Linear whose weight is torchao's Int8Tensor with per-token int8 activations (int8-dynamic).
    On a CPU it quantizes the activations with torchao's own function, multiplies the int8 values
    with torch._int_mm and takes off the activations' zero points in int32 (exact), with the weight's
    row sums computed once; torchao's linear for this tensor sums the weight at every call and
    corrects in floating point (measured, 1024 rows, 768 -> 2304, 2 threads: torchao 15.9 ms, this
    4.8 ms, fp32 11.1 ms; the same outputs within 5e-7). Elsewhere torchao's matmul."""

    eager_under_compile = True  # see _eager_under_compile

    _row_sums: tuple[tuple[int, int], Tensor] | None = None  # ((data pointer, version), row sums)

    @_eager_under_compile
    def forward(self, x: Tensor) -> Tensor:
        # x: (..., in_features) -> (..., out_features) in x's dtype (as torchao's linear)
        weight: Any = self.weight
        if x.device.type != "cpu" or weight.act_quant_kwargs is None or weight.act_pre_scale is not None:
            return F.linear(x, weight, self.bias)
        rows = x.numel() // x.shape[-1]
        values, scale, zero_point = _quantize_activations(x.reshape(rows, -1), weight.act_quant_kwargs)
        acc = torch._int_mm(values, weight.qdata.t())  # (rows, out_features) int32
        if zero_point is not None:  # asymmetric: sum_k (x_k - z) w_k = acc - z * (row sum of w)
            acc = torch.addr(acc, zero_point.reshape(-1).to(torch.int32), self._weight_row_sums(), alpha=-1)
        y = acc.to(torch.float32).mul_(scale.reshape(-1, 1)).mul_(weight.scale.reshape(-1))
        y = y.to(x.dtype).reshape(*x.shape[:-1], -1)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def _weight_row_sums(self) -> Tensor:
        """The int32 sum of each output row of the int8 weight, again after the values change in place."""
        qdata = cast(Any, self.weight).qdata
        key = (qdata.data_ptr(), qdata._version)
        if self._row_sums is None or self._row_sums[0] != key:
            self._row_sums = (key, qdata.sum(dim=-1, dtype=torch.int32))
        return self._row_sums[1]


def _quantize_activations(x: Tensor, kwargs: Any) -> tuple[Tensor, Tensor, Tensor | None]:
    """int8 values (rows, K), scale (rows, 1) and zero point (rows, 1) or None of each row of `x`, as
    torchao's Int8Tensor.from_hp quantizes activations for `kwargs`. fp32 rows, asymmetric (the
    int8-dynamic scheme's): its formulas (choose_qparams_affine, quantize_affine) in five in-place
    passes, a third of the time of torchao's general code; anything else by torchao's own function."""
    from torchao.quantization import MappingType, PerRow, PerToken

    plain = (
        x.dtype == torch.float32
        and kwargs.mapping_type == MappingType.ASYMMETRIC
        and isinstance(kwargs.granularity, PerRow | PerToken)
        and not kwargs.reduce_range
    )
    if not plain:
        from torchao.quantization.quantize_.common import _choose_quant_func_and_quantize_tensor

        q = _choose_quant_func_and_quantize_tensor(x, kwargs)
        return q.qdata, q.scale, q.zero_point
    min_neg = x.amin(-1, keepdim=True).clamp_(max=0)  # (rows, 1)
    max_pos = x.amax(-1, keepdim=True).clamp_(min=0)
    scale = ((max_pos - min_neg) / 255.0).clamp_(min=torch.finfo(torch.float32).eps)
    zero_point = (-128 - torch.round(min_neg / scale)).clamp_(-128, 127)
    values = torch.round(x * (1.0 / scale)).add_(zero_point).clamp_(-128, 127).to(torch.int8)
    return values, scale, zero_point.to(torch.int8)


class Int4WeightOnlyLinear(nn.Linear):
    """nn.Linear whose weight is torchao's IntxUnpackedToInt8Tensor of int4 (values in int8 (out, in), a
    scale per group); on a CPU with bf16 compute, up to INT4PACK_MAX_ROWS rows, it multiplies with
    PyTorch's int4 CPU kernel (tinygemm) on a packed copy of the weight, elsewhere with torchao's
    matmul (which dequantizes the whole weight at every call)."""

    eager_under_compile = True  # see _eager_under_compile

    _packed: tuple[tuple[int, int], Tensor, Tensor] | None = None  # (versions, weight, scales and zeros)

    def _tinygemm(self) -> tuple[Tensor, Tensor]:
        """The weight in tinygemm's layout, packed on first use and again after the values change in
        place (as the load path's copy does): tinygemm's uint4 values q + 8 with zero points 0
        dequantize to (q + 8 - 8) * scale, the symmetric int4 weight exactly."""
        weight: Any = self.weight
        versions = (weight.qdata._version, weight.scale._version)
        if self._packed is None or self._packed[0] != versions:
            from torchao.quantization.utils import pack_tinygemm_scales_and_zeros

            values = weight.qdata.to(torch.int32) + 8  # (out, in) in [0, 15]
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                values, 1
            )  # inner k tiles: unused on CPU
            scale = weight.scale.to(torch.bfloat16)  # (out, in // group); the kernel takes bf16 scales
            scale_and_zero = pack_tinygemm_scales_and_zeros(scale, torch.zeros_like(scale), torch.bfloat16)
            self._packed = (versions, packed, scale_and_zero)
        return self._packed[1], self._packed[2]

    @_eager_under_compile
    def forward(self, x: Tensor) -> Tensor:
        # x: (..., in_features) -> (..., out_features) in the compute dtype (as autocast's linear)
        dtype = _compute_dtype(x)
        rows = x.numel() // x.shape[-1]
        weight: Any = self.weight
        group = weight.block_size[-1]
        if (
            x.device.type != "cpu"
            or dtype != torch.bfloat16
            or rows > INT4PACK_MAX_ROWS
            or group not in (32, 64, 128)
        ):
            return F.linear(x.to(dtype), weight, None if self.bias is None else self.bias.to(dtype))
        packed, scale_and_zero = self._tinygemm()
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.reshape(rows, -1).to(dtype), packed, group, scale_and_zero
        )
        y = y.reshape(*x.shape[:-1], -1)  # (..., out_features)
        return y if self.bias is None else y + self.bias.to(dtype)


class QuantizedEmbedding(nn.Embedding):
    """nn.Embedding whose table is a torchao quantized tensor (qdata (V, D) int8 and a scale and zero
    point per row or per group of each row: IntxUnpackedToInt8Tensor, or a tied head's Int8Tensor);
    a lookup dequantizes only the rows it reads."""

    def forward(self, idx: Tensor) -> Tensor:
        # idx: (...) token ids -> (..., D) in the table's dtype
        table: Any = self.weight  # a torchao tensor subclass
        n_rows = table.qdata.shape[0]
        rows = F.embedding(idx, table.qdata)  # (..., D) int8
        scale = F.embedding(idx, table.scale.reshape(n_rows, -1))  # (..., G): G groups per row
        values = rows.unflatten(-1, (scale.shape[-1], -1)).to(scale.dtype)  # (..., G, D // G)
        if table.zero_point is not None:
            zero_point = F.embedding(idx, table.zero_point.reshape(n_rows, -1))  # (..., G)
            values = values - zero_point.unsqueeze(-1).to(scale.dtype)
        return (values * scale.unsqueeze(-1)).flatten(-2).to(table.dtype)  # as torchao's dequantize


def _embedding_and_head(model: nn.Module) -> tuple[nn.Embedding | None, nn.Linear | None, bool]:
    """The token embedding, the output head and whether they share their weight."""
    stages = spec_of(model).stages
    embedding, head = getattr(model, stages.embedding, None), getattr(model, stages.head, None)
    embedding = embedding if isinstance(embedding, nn.Embedding) else None
    head = head if isinstance(head, nn.Linear) else None
    tied = embedding is not None and head is not None and embedding.weight is head.weight
    return embedding, head, tied


def _quantized_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The linear layers a scheme quantizes: all but a classifier head."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.split(".")[-1] != "classifier"
    }


def check_group_size(model: nn.Module, scheme: str, group_size: int | None) -> None:
    """ConfigError unless `group_size` suits the scheme and every layer it quantizes."""
    if scheme != "int4-weight":
        if group_size is not None:
            raise ConfigError(
                f"--group-size is for int4-weight; scheme {scheme} has one scale per output channel"
            )
        return
    group_size = group_size or DEFAULT_GROUP_SIZE
    if group_size not in GROUP_SIZES:
        raise ConfigError(f"--group-size must be one of {', '.join(map(str, GROUP_SIZES))}, got {group_size}")
    embedding, _, _ = _embedding_and_head(model)
    widths = {name: m.in_features for name, m in _quantized_linears(model).items()}
    if embedding is not None:
        widths[spec_of(model).stages.embedding] = embedding.embedding_dim
    for name, width in widths.items():
        if width % group_size:
            raise ConfigError(
                f"--group-size {group_size} does not divide the {width} inputs of layer '{name}' (int4-weight)"
            )


def quantize_model(
    model: FamilyModel,
    scheme: str,
    group_size: int | None = None,
    hqq: bool = False,
    qat_blocks: bool = False,
) -> FamilyModel:
    """Quantize `model` in place with torchao for `scheme` (the module docstring lists what each
    scheme quantizes); returns it. hqq: int4-weight's scales by HQQ instead of plain min-max.
    qat_blocks: the linear layers inside the blocks trained against QAT's fake quantizer get its plain
    min-max scales (torchao's convert step), whatever `hqq` says."""
    ao = _torchao()
    check_group_size(model, scheme, group_size)
    embedding, head, tied = _embedding_and_head(model)
    linears = _quantized_linears(model)
    in_blocks = f"{spec_of(model).blocks}."
    trained = {m for name, m in linears.items() if qat_blocks and name.startswith(in_blocks)}
    with quiet_torchao():  # torchao imports some of its modules on the first call
        if trained:
            ao.quantize_(
                model, linear_config(scheme, group_size), filter_fn=lambda module, fqn: module in trained
            )
        others = set(linears.values()) - trained
        ao.quantize_(
            model, linear_config(scheme, group_size, hqq), filter_fn=lambda module, fqn: module in others
        )
    # On a CPU, PyTorch's int8 and int4 weight kernels for a few rows and its int8 matmul for int8-dynamic
    # (lmforge's subclasses of nn.Linear: only the forward differs, the weight and its state stay as
    # torchao made them).
    kernel_class = {
        "int8-weight": Int8WeightOnlyLinear,
        "int8-dynamic": Int8DynamicLinear,
        "int4-weight": Int4WeightOnlyLinear,
    }.get(scheme)
    for module in linears.values():
        if kernel_class is not None:
            module.__class__ = kernel_class
    table_config = _embedding_config(scheme, group_size, hqq)
    if embedding is None or table_config is None:
        return model
    if tied:
        assert head is not None
        embedding.weight = head.weight  # one quantized tensor for both, as one fp32 tensor before
    else:
        ao.quantize_(model, table_config, filter_fn=lambda module, fqn: module is embedding)
    embedding.__class__ = QuantizedEmbedding
    return model


# ---------------------------------------------------------------------------- the artifact's tensors


def _is_quantized(tensor: Tensor) -> bool:
    """A torchao tensor subclass (plain tensors and parameters have no __tensor_flatten__)."""
    return hasattr(tensor, "__tensor_flatten__")


def _inner_names(tensor: Any) -> list[str]:
    """The plain tensors inside a torchao tensor subclass, by attribute name (PyTorch's subclass protocol)."""
    names, _ = tensor.__tensor_flatten__()
    return names


def _packs_int4(tensor: Tensor) -> bool:
    """Whether `tensor` holds int4 values in int8 (torchao's IntxUnpackedToInt8Tensor of int4)."""
    return getattr(tensor, "target_dtype", None) == INT4


def pack_int4(values: Tensor) -> Tensor:
    """(..., K) int8 in [-8, 7] -> (..., K // 2) uint8, two values a byte (the even index in the low half)."""
    nibbles = (values.to(torch.int16) + 8).to(torch.uint8)  # [0, 15]
    return nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)


def unpack_int4(packed: Tensor) -> Tensor:
    """The inverse of pack_int4: (..., K // 2) uint8 -> (..., K) int8 in [-8, 7]."""
    nibbles = torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)  # (..., K)
    return (nibbles.to(torch.int16) - 8).to(torch.int8)


def artifact_tensors(model: nn.Module) -> dict[str, Tensor]:
    """Every tensor the artifact holds, by name: a quantized weight NAME as the plain tensors inside it
    (NAME.qdata, NAME.scale, ...; int4 values packed), the others as they are. A tied weight once."""
    tensors: dict[str, Tensor] = {}
    entries = [*model.named_parameters(), *_persistent_buffers(model)]  # named_parameters: a tied weight once
    for name, tensor in entries:
        if not _is_quantized(tensor):
            tensors[name] = tensor.detach()
            continue
        inner_names = _inner_names(tensor)
        for inner in inner_names:
            value = getattr(tensor, inner)
            tensors[f"{name}.{inner}"] = (
                pack_int4(value) if inner == "qdata" and _packs_int4(tensor) else value
            )
    return tensors


def _persistent_buffers(model: nn.Module) -> list[tuple[str, Tensor]]:
    state = model.state_dict(keep_vars=True)
    return [(name, buffer) for name, buffer in model.named_buffers() if name in state]


def _read_headers(path: Path) -> dict[str, tuple[str, list[int]]]:
    """Name -> (safetensors dtype, shape) of every tensor in `path`, from its header only."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {
                key: (f.get_slice(key).get_dtype(), list(f.get_slice(key).get_shape()))
                for key in f.keys()  # noqa: SIM118 - safe_open is not a dict
            }
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"checkpoint file {path} is not a valid safetensors file ({err})") from None


def check_artifact_tensors(expected: dict[str, Tensor], path: Path, what: str) -> None:
    """CheckpointError (one line) unless `path` holds exactly the tensors of `expected`, by name,
    dtype and shape. `what` names the scheme for the message."""
    found = _read_headers(path)
    for name, tensor in expected.items():
        want = (_SAFETENSORS_DTYPES.get(tensor.dtype, str(tensor.dtype)), list(tensor.shape))
        if name not in found:
            raise CheckpointError(f"quantized checkpoint {path}: tensor '{name}' of {what} is missing")
        if found[name] != want:
            raise CheckpointError(
                f"quantized checkpoint {path}: tensor '{name}' is {found[name][0]} {found[name][1]}, "
                f"{what} makes it {want[0]} {want[1]}"
            )
    unexpected = sorted(set(found) - set(expected))
    if unexpected:
        raise CheckpointError(
            f"quantized checkpoint {path} holds tensor '{unexpected[0]}', which {what} does not make"
        )


@torch.no_grad()
def _copy_into(model: nn.Module, path: Path, device: torch.device) -> None:
    """Copy the artifact's tensors into the quantized model's tensors in place (names as artifact_tensors)."""
    with safe_open(str(path), framework="pt", device=str(device)) as f:
        for name, tensor in [*model.named_parameters(), *_persistent_buffers(model)]:
            if not _is_quantized(tensor):
                tensor.copy_(f.get_tensor(name))
                continue
            inner_names = _inner_names(tensor)
            for inner in inner_names:
                value = f.get_tensor(f"{name}.{inner}")
                if inner == "qdata" and _packs_int4(tensor):
                    value = unpack_int4(value)
                getattr(tensor, inner).copy_(value)


def _scheme_of(ckpt_dir: Path) -> CompressConfig:
    compress = load_config(ckpt_dir / "config.yaml").compress
    if compress.quantize not in SCHEMES:
        raise CheckpointError(
            f"{ckpt_dir / 'config.yaml'} names quantization scheme '{compress.quantize}' "
            f"(expected one of {', '.join(SCHEMES)})"
        )
    return compress


def describe_scheme(compress: CompressConfig) -> str:
    group = f" (group size {compress.group_size})" if compress.quantize == "int4-weight" else ""
    return f"scheme {compress.quantize}{group}"


def load_quantized(model: FamilyModel, ckpt_dir: Path, device: torch.device) -> FamilyModel:
    """The quantized model of an artifact written by quantize_run: `model` (built from its config on
    the meta device) materialised on `device`, quantized as its config.yaml says, its tensors checked
    against the file (CheckpointError naming the first that differs) and copied in."""
    compress = _scheme_of(ckpt_dir)
    device = torch.device(device)
    check_device(compress.quantize or "", device)
    model.to_empty(device=device)
    model.init_weights()  # the buffers that are not saved (RoPE tables); the weights are replaced below
    # The modules and tensor types of the scheme; their values are overwritten, so plain min-max
    # scales (HQQ's search would be wasted).
    quantize_model(model, compress.quantize or "", compress.group_size)
    path = ckpt_dir / "model" / WEIGHTS_FILE
    check_artifact_tensors(artifact_tensors(model), path, describe_scheme(compress))
    _copy_into(model, path, device)
    return model


# ---------------------------------------------------------------------------- quantize_run


def _source_model(ckpt_dir: Path) -> FamilyModel:
    """The source checkpoint's model in fp32 on the CPU (a LoRA run's adapters merged)."""
    model = meta_model(ckpt_dir)
    model.to_empty(device="cpu")
    model.init_weights()
    load_model_weights(model, ckpt_dir / "model")
    merge_lora(model)
    return model.eval()


def quantize_checkpoint(
    ckpt_dir: Path, scheme: str, group_size: int | None = None
) -> tuple[FamilyModel, RunConfig]:
    """The checkpoint's model quantized for `scheme` (on the CPU) and the config of its artifact.

    group_size (int4-weight): default the run's qat.group_size for a QAT run, else 32. The blocks of
    a QAT run of the same scheme are converted with the scales their fake quantizer used (torchao's
    QATConfig convert step: the base config applied to the trained weights); other int4 weights get
    scales chosen by HQQ."""
    cfg = load_config(ckpt_dir / "config.yaml")
    if cfg.compress.quantize:
        raise ConfigError(f"{ckpt_dir} is already quantized ({cfg.compress.quantize}): quantize its source")
    if scheme == "int4-weight" and group_size is None:
        group_size = cfg.qat.group_size if cfg.qat.scheme != "none" else DEFAULT_GROUP_SIZE
    # Where it will run: float8 needs a GPU; the int schemes are quantized on the CPU either way.
    check_device(scheme, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    model = _source_model(ckpt_dir)
    check_group_size(model, scheme, group_size)
    qat = cfg.qat.scheme == scheme
    quantize_model(model, scheme, group_size, hqq=scheme == "int4-weight", qat_blocks=qat)
    compress = replace(cfg.compress, quantize=scheme, group_size=group_size, source=str(ckpt_dir.resolve()))
    # The source's data directory, so that `lmforge eval OUT` reads its validation split.
    data_dir = data_dir_for(
        cfg.data, ckpt_dir.parent.parent if ckpt_dir.parent.name == "checkpoints" else ckpt_dir
    )
    data = (
        replace(cfg.data, dir=str(data_dir.resolve())) if (data_dir / "manifest.json").is_file() else cfg.data
    )
    # The weights were merged with any LoRA adapters: the artifact has none.
    return model, replace(cfg, compress=compress, data=data, lora=LoraConfig())


def quantize_run(ckpt_dir: Path, scheme: str, out_dir: Path, group_size: int | None) -> Path:
    """Quantize the checkpoint's model for `scheme` (quantize_checkpoint) and write the artifact run
    directory `out_dir` (layout in the module docstring); returns out_dir."""
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ConfigError(f"--out {out_dir} exists and is not an empty directory")
    model, cfg = quantize_checkpoint(ckpt_dir, scheme, group_size)
    write_artifact(out_dir, cfg, artifact_tensors(model), ckpt_dir, int(read_manifest(ckpt_dir)["step"]))
    return out_dir


def write_artifact(
    out_dir: Path, cfg: RunConfig, tensors: dict[str, Tensor], source: Path, step: int
) -> Path:
    """OUT/config.yaml, OUT/tokenizer.json and the checkpoint OUT/checkpoints/step_N (model/,
    config.yaml, tokenizer.json, then its manifest), written in a temporary directory renamed into
    place: a crash leaves no checkpoint that verifies. Returns the checkpoint directory."""
    config_text = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    root = out_dir / "checkpoints"
    final = root / checkpoint_name(step)
    tmp = root / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "model").mkdir(parents=True)
    # Contiguous copies that own their memory: safetensors refuses views and shared storage.
    save_file({name: t.contiguous().clone() for name, t in tensors.items()}, str(tmp / "model" / WEIGHTS_FILE),
              metadata={"format": "pt", "lmforge_quantize": cfg.compress.quantize or ""})  # fmt: skip
    (tmp / "config.yaml").write_text(config_text)
    shutil.copyfile(source / "tokenizer.json", tmp / "tokenizer.json")
    files = {
        str(p.relative_to(tmp)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(tmp.rglob("*"))
        if p.is_file()
    }
    manifest = {"format": FORMAT_VERSION, "step": step, "config_sha256": config_sha256(cfg), "files": files}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    for name, write in (("config.yaml", lambda p: p.write_text(config_text)),
                        ("tokenizer.json", lambda p: shutil.copyfile(source / "tokenizer.json", p))):  # fmt: skip
        write(out_dir / f".{name}.tmp")
        os.replace(out_dir / f".{name}.tmp", out_dir / name)
    os.replace(tmp, final)
    return final

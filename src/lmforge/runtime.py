"""Device, precision and hardware facts shared by the training, inference and bench stages."""

from __future__ import annotations

import contextlib
import os

import torch

from lmforge.errors import ConfigError

# Dense bf16 tensor-core peaks (no sparsity), from the vendors' data sheets, matched in order
# against torch.cuda.get_device_name(). MFU is reported against these; the entry used is named.
PEAK_BF16_FLOPS: list[tuple[tuple[str, ...], float, str]] = [
    (("H100", "PCIe"), 756e12, "H100 PCIe"),
    (("H100",), 989e12, "H100 SXM"),
    (("H200",), 989e12, "H200"),
    (("A100",), 312e12, "A100"),
    (("L4",), 121e12, "L4"),
    (("A10",), 125e12, "A10"),
    (("4090",), 165e12, "RTX 4090"),
]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"config key 'train.device' is {name!r} but CUDA is not available on this machine")
    return device


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """The autocast dtype: fp32 on CPU; bf16 on GPUs that support it, else fp16."""
    if precision == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and precision == "fp16":
        raise ConfigError(
            "config key 'train.precision' is 'fp16', which is not supported on CPU (use fp32 or bf16)"
        )
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """The one place autocast is entered: weights stay fp32, matmuls run in `dtype`."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def configure_backends(device: torch.device) -> None:
    if device.type == "cuda":
        # TF32 for the fp32 matmuls that remain outside autocast (e.g. in the optimizer).
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def peak_flops(device: torch.device) -> tuple[float | None, str]:
    """(peak bf16 dense FLOP/s, which table entry) for MFU; (None, reason) where unknown."""
    if device.type != "cuda":
        return None, f"no peak known for {device.type}"
    override = os.environ.get("LMFORGE_PEAK_FLOPS")
    if override:
        return float(override), f"LMFORGE_PEAK_FLOPS={override}"
    name = torch.cuda.get_device_name(device)
    for words, flops, label in PEAK_BF16_FLOPS:
        if all(w in name for w in words):
            return flops, f"{label} bf16 dense {flops / 1e12:.0f} TFLOP/s"
    return None, f"no peak known for {name}"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_gib(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return None

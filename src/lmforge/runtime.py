"""Device, precision and hardware facts shared by the training, inference and bench stages."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import platform
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import torch

from lmforge.errors import ConfigError
from lmforge.hardware import cuda_device


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"config key 'train.device' is {name!r} but CUDA is not available on this machine")
    return device


@functools.cache
def cpu_native_bf16() -> str | None:
    """The instructions this CPU computes bf16 matmuls with natively (AMX, AVX512_BF16, or aarch64's
    BF16 extension), or None where oneDNN would only emulate bf16 (slower than fp32 there).

    On aarch64 PyTorch's own check (oneDNN's, torch.ops.mkldnn._is_mkldnn_bf16_supported) asks
    for the BF16 extension; on x86 it accepts any AVX-512 core, which converts but has no bf16
    dot product, so there the CPUID bits cpuinfo reads for torch.cpu are asked instead."""
    if not torch.backends.mkldnn.is_available():
        return None
    if platform.machine().lower() in ("x86_64", "amd64", "i386", "i686"):
        # Private helpers of torch.cpu (present in torch 2.3 to 2.13); absent, the answer is "no".
        if getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)():
            return "AMX"
        return "AVX512_BF16" if getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)() else None
    return "BF16 extension" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else None


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """The autocast dtype. auto: bf16 on GPUs that support it, else fp16; on CPU bf16 where the
    CPU has native bf16 instructions (cpu_native_bf16), else fp32."""
    if precision == "auto":
        if device.type == "cpu":
            return torch.bfloat16 if cpu_native_bf16() else torch.float32
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and precision == "fp16":
        raise ConfigError(
            "config key 'train.precision' is 'fp16', which is not supported on CPU (use fp32 or bf16)"
        )
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


PRECISION_NAMES: dict[torch.dtype, Literal["fp32", "bf16", "fp16"]] = {
    torch.float32: "fp32",
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
}


def describe_precision(precision: str, device: torch.device) -> str:
    """What train.precision resolves to on `device` and, for auto, why (the run's first lines)."""
    name = PRECISION_NAMES[resolve_precision(precision, device)]
    if precision != "auto":
        return name
    if device.type == "cpu":
        native = cpu_native_bf16()
        why = f"this CPU computes bf16 natively with {native}" if native else "this CPU has no native bf16"
    elif device.type == "cuda":
        why = "this GPU supports bf16" if name == "bf16" else "this GPU has no bf16"
    else:
        why = f"device {device.type}"
    return f"{name} (auto: {why})"


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """The one place autocast is entered: weights stay fp32, matmuls run in `dtype`."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@contextlib.contextmanager
def quiet_torchao() -> Iterator[None]:
    """Within the block, torchao's imports (and its first calls, which import more of it) log no
    warnings: one for each optional CUDA extension a CPU-only machine cannot load, and torch's for an
    enum torchao registers. Noise for a user of `lmforge generate` or `compress`."""
    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def require_float8_gpu(device: torch.device, what: str) -> None:
    """ConfigError (one line, naming `what`) unless `device` is an NVIDIA GPU of compute capability
    >= 8.9 (Ada, Hopper, Blackwell): float8 matmuls need one."""
    if device.type != "cuda":
        raise ConfigError(f"{what} needs a CUDA GPU of compute capability >= 8.9; the device is {device}")
    capability = torch.cuda.get_device_capability(device)
    if capability < (8, 9):
        raise ConfigError(
            f"{what} needs a GPU of compute capability >= 8.9; "
            f"{torch.cuda.get_device_name(device)} has {capability[0]}.{capability[1]}"
        )


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
    entry = cuda_device(name)  # lmforge/hardware.yaml, the planner's catalogue
    if entry is None:
        return None, f"no peak known for {name}"
    return entry.bf16_flops, f"{entry.name} bf16 dense {entry.bf16_flops / 1e12:.0f} TFLOP/s"


def process_age_s() -> float:
    """Seconds since this process started (interpreter start and imports included): its start time
    from Linux's /proc against the same clock (CLOCK_BOOTTIME); 0.0 where either is not available."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        since_boot_s = time.clock_gettime(time.CLOCK_BOOTTIME)
        return max(0.0, since_boot_s - int(fields[19]) / os.sysconf("SC_CLK_TCK"))  # field 22: starttime
    except (OSError, ValueError, IndexError, AttributeError):
        return 0.0


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_gib(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return None

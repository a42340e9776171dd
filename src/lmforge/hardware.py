"""The hardware catalogue (hardware.yaml beside this file): peaks, memory and links of each device.

One table for the planner (`lmforge plan`) and for MFU in `lmforge bench` and the training logs
(`lmforge.runtime.peak_flops`). Users add devices with a YAML file of the same form.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from lmforge.errors import ConfigError

CATALOGUE = Path(__file__).with_name("hardware.yaml")
_REQUIRED = ("bf16_tflops", "memory_gib", "memory_bandwidth_gbs", "intra_node_gbs", "inter_node_gbs")


@dataclass(frozen=True)
class Device:
    """One accelerator as the planner sees it. Bandwidths in bytes/s per device, one direction."""

    name: str
    bf16_flops: float  # dense peak, FLOP/s
    fp8_flops: float | None  # dense peak, FLOP/s; None: no fp8 matmuls
    memory_bytes: float
    memory_bandwidth: float
    intra_node_bandwidth: float
    inter_node_bandwidth: float
    gpus_per_node: int
    cuda_names: tuple[tuple[str, ...], ...] = ()

    @property
    def memory_gib(self) -> float:
        return self.memory_bytes / 2**30


def _device(name: str, entry: object, source: Path) -> Device:
    if not isinstance(entry, dict):
        raise ConfigError(f"{source}: device {name!r} must be a mapping of its figures")
    missing = [key for key in _REQUIRED if key not in entry]
    if missing:
        raise ConfigError(f"{source}: device {name!r} lacks {', '.join(missing)}")
    known = {*_REQUIRED, "fp8_tflops", "gpus_per_node", "cuda_names"}
    unknown = sorted(set(entry) - known)
    if unknown:
        raise ConfigError(f"{source}: device {name!r} has unknown key(s) {unknown}; keys are {sorted(known)}")
    try:
        numbers = {key: float(entry[key]) for key in (*_REQUIRED, "fp8_tflops") if entry.get(key) is not None}
        gpus_per_node = int(entry.get("gpus_per_node", 8))
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{source}: device {name!r}: a figure is not a number ({err})") from None
    if any(not math.isfinite(value) or value <= 0 for value in numbers.values()) or gpus_per_node < 1:
        raise ConfigError(f"{source}: device {name!r}: every figure must be a positive number")
    patterns = entry.get("cuda_names", [])
    if not isinstance(patterns, list) or not all(
        isinstance(words, list) and all(isinstance(w, str) for w in words) for words in patterns
    ):
        raise ConfigError(f"{source}: device {name!r}: cuda_names must be a list of lists of words")
    fp8 = numbers.get("fp8_tflops")
    return Device(
        name=name,
        bf16_flops=numbers["bf16_tflops"] * 1e12,
        fp8_flops=fp8 * 1e12 if fp8 else None,
        memory_bytes=numbers["memory_gib"] * 2**30,
        memory_bandwidth=numbers["memory_bandwidth_gbs"] * 1e9,
        intra_node_bandwidth=numbers["intra_node_gbs"] * 1e9,
        inter_node_bandwidth=numbers["inter_node_gbs"] * 1e9,
        gpus_per_node=gpus_per_node,
        cuda_names=tuple(tuple(words) for words in entry.get("cuda_names", [])),
    )


def _read(path: Path) -> dict[str, Device]:
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as err:
        raise ConfigError(f"hardware file {path}: {err.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"hardware file {path} is not UTF-8 text") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"hardware file {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"hardware file {path}: expected a mapping of device names to their figures")
    return {str(name): _device(str(name), entry, path) for name, entry in raw.items()}


@functools.cache
def _builtin() -> dict[str, Device]:
    return _read(CATALOGUE)


def devices(extra: str | Path | None = None) -> dict[str, Device]:
    """The catalogue, with the devices of the YAML file `extra` added (replacing same names)."""
    table = dict(_builtin())
    if extra is not None:
        table.update(_read(Path(extra)))
    return table


def device(name: str, extra: str | Path | None = None) -> Device:
    table = devices(extra)
    if name not in table:
        raise ConfigError(
            f"unknown device {name!r}; known: {', '.join(sorted(table))} (add one with --hardware FILE)"
        )
    return table[name]


def cuda_device(cuda_name: str) -> Device | None:
    """The catalogue entry for torch.cuda.get_device_name()'s answer: of the entries with a pattern
    whose words all appear in the name, the one with the longest such pattern (ties: file order)."""
    # Whole words: "L4" must not match "NVIDIA L40S", nor "H200" "NVIDIA GH200 480GB".
    tokens = set(re.split(r"[^A-Za-z0-9]+", cuda_name))
    matches = [
        (len(words), d)
        for d in _builtin().values()
        for words in d.cuda_names
        if all(w in tokens for w in words)
    ]
    return max(matches, key=lambda m: m[0])[1] if matches else None

"""Model families, their named sizes ("flavors"), and building a model from a config.

Each family lives in its own folder (`llama/`, `gpt2/`) as one readable model file plus a flavor
table. `FAMILIES` below is the whole registry: family name -> (config class, model class, flavors).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from lmforge.models.gpt2.flavors import FLAVORS as GPT2_FLAVORS
from lmforge.models.gpt2.model import GPT2, GPT2Config
from lmforge.models.kv_cache import KVCache
from lmforge.models.llama.flavors import FLAVORS as LLAMA_FLAVORS
from lmforge.models.llama.model import Llama, LlamaConfig

ModelConfig = LlamaConfig | GPT2Config

FAMILIES: dict[str, tuple[type, type[nn.Module], dict]] = {
    "llama": (LlamaConfig, Llama, LLAMA_FLAVORS),
    "gpt2": (GPT2Config, GPT2, GPT2_FLAVORS),
}


def model_config(family: str, flavor: str, **overrides: object) -> LlamaConfig | GPT2Config:
    """The config of a named flavor, with `overrides` replacing fields; the table is not modified.

    `__post_init__` validation runs again on the result. Derived fields keep the flavor's resolved
    value unless overridden: e.g. overriding a Llama `dim` keeps the flavor's `ffn_hidden`; pass
    `ffn_hidden=None` to derive it again from the new `dim`.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; choose one of {sorted(FAMILIES)}")
    config_cls, _, flavors = FAMILIES[family]
    if flavor not in flavors:
        raise ValueError(f"unknown {family} flavor {flavor!r}; choose one of {list(flavors)}")
    field_names = [f.name for f in dataclasses.fields(config_cls)]
    unknown = sorted(set(overrides) - set(field_names))
    if unknown:
        raise ValueError(f"unknown {config_cls.__name__} field(s) {unknown}; fields are {field_names}")
    return dataclasses.replace(flavors[flavor], **overrides)  # a new object; runs __post_init__


def build_model(cfg: LlamaConfig | GPT2Config, device: str | torch.device = "cpu") -> nn.Module:
    """Build the model for `cfg` on `device`, with weights initialised (see the model's init_weights).

    The modules are always created on the meta device first, so no memory is spent on PyTorch's
    default initialisation that init_weights would overwrite. With device="meta" nothing is
    allocated at all: use that to count parameters or to shard a large model before materialising
    it with `model.to_empty(device=...)` and `model.init_weights()`.
    """
    model_cls = next((m for c, m, _ in FAMILIES.values() if type(cfg) is c), None)
    if model_cls is None:
        raise ValueError(
            f"no model family has config type {type(cfg).__name__}; families: {sorted(FAMILIES)}"
        )
    with torch.device("meta"):
        model = model_cls(cfg)
    if torch.device(device).type != "meta":
        model.to_empty(device=device)
        model.init_weights()
    return model


__all__ = [
    "FAMILIES",
    "GPT2",
    "GPT2_FLAVORS",
    "KVCache",
    "LLAMA_FLAVORS",
    "GPT2Config",
    "Llama",
    "LlamaConfig",
    "ModelConfig",
    "build_model",
    "model_config",
]

"""Model families, their named sizes ("flavors"), and building a model from a config.

Each family lives in its own folder (`llama/`, `gpt2/`): one readable model file, a flavor table,
and `parallelize.py`, which names the modules the parallel code applied from outside needs to know
(blocks, pipeline stages, tensor-parallel plan). The folder's `SPEC` (a `FamilySpec`, see spec.py)
puts them together, and `FAMILIES` below is the whole registry: adding a family is adding a folder
and one line there.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from lmforge.models import bert, gpt2, llama
from lmforge.models.bert.model import Bert, BertConfig
from lmforge.models.gpt2.flavors import FLAVORS as GPT2_FLAVORS
from lmforge.models.gpt2.model import GPT2, GPT2Config
from lmforge.models.kv_cache import KVCache
from lmforge.models.llama.flavors import FLAVORS as LLAMA_FLAVORS
from lmforge.models.llama.model import Llama, LlamaConfig
from lmforge.models.spec import FamilySpec

FAMILIES: dict[str, FamilySpec] = {
    "llama": llama.SPEC,
    "gpt2": gpt2.SPEC,
    "bert": bert.SPEC,
}

# The config of any family, for type hints (a type checker needs the classes spelled out; a test
# checks that they are those of FAMILIES). Not lmforge.config.ModelConfig, the run config's section.
FamilyConfig = LlamaConfig | GPT2Config | BertConfig
# The model of any family, for type hints (spelled out and checked against FAMILIES the same way).
# A pipeline stage is one too: a pruned copy of the model, of the same class.
FamilyModel = Llama | GPT2 | Bert


def family_spec(name: str) -> FamilySpec:
    """The spec of the family called `name` ("llama")."""
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; choose one of {sorted(FAMILIES)}")
    return FAMILIES[name]


def spec_of(model_or_cfg: nn.Module | FamilyConfig) -> FamilySpec:
    """The spec of the family of a model, a pipeline stage of one, or a model config.

    isinstance, not type(): FSDP2's fully_shard swaps a model's class for a subclass (FSDPLlama).
    """
    for spec in FAMILIES.values():
        if isinstance(model_or_cfg, (spec.model, spec.config)):
            return spec
    raise ValueError(
        f"{type(model_or_cfg).__name__} is neither a model nor a config of a model family; "
        f"families: {sorted(FAMILIES)}"
    )


def blocks(model: nn.Module) -> nn.ModuleDict:
    """The transformer blocks of a model or pipeline stage, keyed by global layer index ("0", ...).

    A pipeline stage holds only its own blocks, under the names they have in the full model.
    """
    return getattr(model, spec_of(model).blocks)


def model_config(family: str, flavor: str, **overrides: object) -> FamilyConfig:
    """The config of a named flavor, with `overrides` replacing fields; the table is not modified.

    `__post_init__` validation runs again on the result. Derived fields keep the flavor's resolved
    value unless overridden: e.g. overriding a Llama `dim` keeps the flavor's `ffn_hidden`; pass
    `ffn_hidden=None` to derive it again from the new `dim`. A Llama `head_dim` (stored: a pruned model
    sets it) is derived again when `dim` or `n_heads` is overridden without it.
    """
    spec = family_spec(family)
    if flavor not in spec.flavors:
        raise ValueError(f"unknown {family} flavor {flavor!r}; choose one of {list(spec.flavors)}")
    field_names = [f.name for f in dataclasses.fields(spec.config)]
    unknown = sorted(set(overrides) - set(field_names))
    if unknown:
        raise ValueError(f"unknown {spec.config.__name__} field(s) {unknown}; fields are {field_names}")
    if "head_dim" in field_names and "head_dim" not in overrides and {"dim", "n_heads"} & set(overrides):
        overrides = {**overrides, "head_dim": None}  # a stored head_dim follows dim / n_heads unless set
    return dataclasses.replace(spec.flavors[flavor], **overrides)  # a new object; runs __post_init__


def build_model(cfg: FamilyConfig, device: str | torch.device = "cpu") -> FamilyModel:
    """Build the model for `cfg` on `device`, with weights initialised (see the model's init_weights).

    The modules are always created on the meta device first, so no memory is spent on PyTorch's
    default initialisation that init_weights would overwrite. With device="meta" nothing is
    allocated at all: use that to count parameters or to shard a large model before materialising
    it with `model.to_empty(device=...)` and `model.init_weights()`.
    """
    spec = next((s for s in FAMILIES.values() if type(cfg) is s.config), None)
    if spec is None:
        raise ValueError(
            f"no model family has config type {type(cfg).__name__}; families: {sorted(FAMILIES)}"
        )
    with torch.device("meta"):
        model = spec.model(cfg)
    assert isinstance(model, FamilyModel)  # FamilySpec.model is only typed type[nn.Module]
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
    "FamilyConfig",
    "FamilyModel",
    "FamilySpec",
    "GPT2Config",
    "Llama",
    "LlamaConfig",
    "blocks",
    "build_model",
    "family_spec",
    "model_config",
    "spec_of",
]

"""The family registry agrees with the models: every module a family's parallel plans name exists
and has the right type, and every parameter is covered by them, so that a renamed or added module
cannot silently drop out of a tensor-parallel plan or a pipeline stage."""

from __future__ import annotations

import typing

import pytest
from torch import nn

from lmforge.models import (
    FAMILIES,
    FamilyConfig,
    FamilyModel,
    blocks,
    build_model,
    family_spec,
    model_config,
    spec_of,
)
from lmforge.models.spec import GatherInput
from lmforge.parallel.pipeline import stage_module

FAMILY_NAMES = list(FAMILIES)

# The module type each tensor-parallel kind is turned into a DTensor style for.
KIND_TYPES = {
    "embedding": nn.Embedding,
    "position_embedding": nn.Embedding,
    "colwise": nn.Linear,
    "rowwise": nn.Linear,
    "head": nn.Linear,
}


def _meta_model(family: str, **overrides: object) -> FamilyModel:
    return build_model(model_config(family, "debug", **overrides), device="meta")


def _missing(module: nn.Module, names: typing.Iterable[str]) -> list[str]:
    missing = []
    for name in names:
        try:
            module.get_submodule(name)
        except AttributeError:
            missing.append(name)
    return missing


def test_registry_lists_each_family_once() -> None:
    assert all(spec.name == name for name, spec in FAMILIES.items())
    assert len({spec.config for spec in FAMILIES.values()}) == len(FAMILIES)
    assert len({spec.model for spec in FAMILIES.values()}) == len(FAMILIES)
    # FamilyConfig and FamilyModel spell the classes out for type checkers: the same ones.
    assert set(typing.get_args(FamilyConfig)) == {spec.config for spec in FAMILIES.values()}
    assert set(typing.get_args(FamilyModel)) == {spec.model for spec in FAMILIES.values()}


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_every_module_the_plans_name_exists(family: str) -> None:
    spec = FAMILIES[family]
    model = _meta_model(family)
    layout = spec.stages
    root_names = [*spec.tp_plan.root, *layout.first, *layout.last, layout.embedding, layout.head]
    assert _missing(model, root_names) == []
    assert isinstance(getattr(model, spec.blocks), nn.ModuleDict)
    for block in blocks(model).values():
        assert _missing(block, spec.tp_plan.block) == []
    assert all(isinstance(getattr(model.cfg, field), int) for field in spec.tp_divisible)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_plan_kinds_fit_the_modules(family: str) -> None:
    spec = FAMILIES[family]
    model = _meta_model(family)
    block = blocks(model)["0"]
    planned = [(model, name, kind) for name, kind in spec.tp_plan.root.items()]
    planned += [(block, name, kind) for name, kind in spec.tp_plan.block.items()]
    for parent, name, kind in planned:
        module = parent.get_submodule(name)
        if isinstance(kind, GatherInput):
            assert any(isinstance(m, nn.Linear) for m in module.modules()), name  # a sub-block
        elif kind == "norm":
            assert [p.dim() for p in module.parameters()] in ([1], [1, 1]), name  # weight (and bias)
        else:
            assert isinstance(module, KIND_TYPES[kind]), (name, kind)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_plans_cover_every_parameter(family: str) -> None:
    spec = FAMILIES[family]
    model = _meta_model(family)
    layers = blocks(model)
    planned = set(spec.tp_plan.root)
    planned |= {f"{spec.blocks}.{i}.{name}" for i in layers for name in spec.tp_plan.block}
    names = [name for name, _ in model.named_parameters(remove_duplicate=False)]
    assert [name for name in names if name.rpartition(".")[0] not in planned] == []
    # Outside the blocks, every parameter is on the first or the last pipeline stage.
    roots = {name.split(".")[0] for name in names} - {spec.blocks}
    assert roots == {*spec.stages.first, *spec.stages.last}
    assert spec.stages.embedding in spec.stages.first
    assert spec.stages.head in spec.stages.last


# Llama-3.2-1B ties its embeddings, llama debug does not; gpt2 and bert always tie.
@pytest.mark.parametrize(
    ("family", "flavor"),
    [(f, flavor) for f in FAMILY_NAMES for flavor in ("debug", "1b" if f != "bert" else "large")],
)
def test_ties_embeddings_says_whether_the_model_ties(family: str, flavor: str) -> None:
    spec = FAMILIES[family]
    model = build_model(model_config(family, flavor), device="meta")
    layout = spec.stages
    tied = model.get_submodule(layout.head).weight is model.get_submodule(layout.embedding).weight
    assert layout.ties_embeddings(model.cfg) == tied


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_blocks_are_keyed_by_global_layer_index(family: str) -> None:
    model = _meta_model(family, n_layers=3)
    assert list(blocks(model)) == ["0", "1", "2"]
    assert blocks(model) is getattr(model, FAMILIES[family].blocks)
    assert list(blocks(stage_module(model, 1, 3))) == ["1"]
    assert list(blocks(stage_module(model, 0, 2))) == ["0", "1"]


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_spec_of_a_model_a_config_a_stage_and_a_wrapped_model(family: str) -> None:
    spec = family_spec(family)
    assert spec is FAMILIES[family]
    model = _meta_model(family)
    assert spec_of(model) is spec
    assert spec_of(model.cfg) is spec
    assert spec_of(stage_module(model, 1, 2)) is spec
    # FSDP2's fully_shard swaps the model's class for a subclass of it (FSDPLlama), as here.
    model.__class__ = type(f"FSDP{type(model).__name__}", (type(model),), {})
    assert spec_of(model) is spec


def test_unknown_names_and_types_list_the_families() -> None:
    with pytest.raises(ValueError, match="gpt2.*llama"):
        family_spec("mamba")
    with pytest.raises(ValueError, match="gpt2.*llama"):
        spec_of(nn.Linear(2, 2))

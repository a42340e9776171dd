from pathlib import Path

import pytest

from lmforge.config import RunConfig, load_config, parse_config_dict, save_config
from lmforge.errors import ConfigError

RECIPES = Path(__file__).parents[2] / "recipes"


@pytest.mark.parametrize("recipe", sorted(p.stem for p in RECIPES.glob("*.yaml")))
def test_recipes_load_and_round_trip(recipe, tmp_path):
    cfg = load_config(RECIPES / f"{recipe}.yaml")
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"train": {"max_step": 5}}, "unknown config key 'train.max_step'"),
        ({"trian": {"max_steps": 5}}, "unknown config section 'trian'"),
        ({"train": {"max_steps": "five"}}, "'train.max_steps': expected a int"),
        ({"train": {"max_steps": 0}}, "'train.max_steps' must be > 0"),
        ({"optim": {"name": "lion"}}, "'optim.name'"),
        ({"optim": {"betas": [0.9]}}, "'optim.betas'"),
        (
            {"train": {"micro_batch_size": 3, "global_batch_tokens": 100}},
            "'train.global_batch_tokens' must be a multiple",
        ),
    ],
)
def test_bad_config_names_the_key(values, message):
    with pytest.raises(ConfigError) as err:
        parse_config_dict(values)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_overrides_keep_other_defaults():
    cfg = parse_config_dict({"train": {"max_steps": 7}})
    assert cfg.train.max_steps == 7
    assert cfg.train.seed == RunConfig().train.seed
    assert cfg.schedule_steps == 7


def test_invalid_yaml_is_one_line(tmp_path):
    (tmp_path / "bad.yaml").write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (
            {"family": "t5"},
            "'model.family': unknown model family 't5'; choose one of ['bert', 'gpt2', 'llama']",
        ),
        ({"family": "llama", "flavor": "huge"}, "'model.flavor': unknown llama flavor 'huge'"),
        (
            {"family": "gpt2", "flavor": "debug", "qk_norm": True},
            "'model.qk_norm' must be false for family gpt2",
        ),
    ],
)
def test_a_model_the_registry_does_not_have_is_refused_before_any_work(model, message, tmp_path):
    """The model section names families by the registry (lmforge.models.FAMILIES), checked at the
    start of a run: one line naming the key, and no run directory."""
    from lmforge.train.pretrain import pretrain

    with pytest.raises(ConfigError) as err:
        pretrain(parse_config_dict({"model": model}), tmp_path / "run")
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "run").exists()


def test_model_shape_replaces_the_flavors_fields_and_bad_fields_are_named():
    from lmforge.config import ModelConfig
    from lmforge.rundir import check_model_section, run_model_config

    shaped = ModelConfig(family="llama", flavor="debug", shape={"dim": 48, "n_heads": 3, "n_kv_heads": 1})
    check_model_section(shaped)
    cfg = run_model_config(shaped, seq_len=32, tokenizer_vocab=300)
    assert (cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.n_layers, cfg.max_seq_len) == (48, 3, 1, 2, 32)
    for shape, message in [
        ({"width": 48}, "config key 'model.shape': unknown LlamaConfig field(s) ['width']"),
        ({"dim": 50}, "config key 'model.shape': LlamaConfig.dim=50 must be divisible by n_heads=4"),
        (
            {"vocab_size": 99},
            "config key 'model.shape' sets ['vocab_size']: use model.vocab_size and data.seq_len",
        ),
        ({"rope_theta": "abc"}, "config key 'model.shape': "),  # a string where a number belongs
    ]:
        with pytest.raises(ConfigError) as err:
            check_model_section(ModelConfig(family="llama", flavor="debug", shape=shape))
        assert str(err.value).startswith(message), str(err.value)
    # the encoder's positions take a string; a wrong one is named
    check_model_section(ModelConfig(family="bert", flavor="debug", shape={"positions": "rotary"}))
    with pytest.raises(
        ConfigError, match="'model.shape': BertConfig.positions must be 'learned' or 'rotary'"
    ):
        check_model_section(ModelConfig(family="bert", flavor="debug", shape={"positions": "alibi"}))

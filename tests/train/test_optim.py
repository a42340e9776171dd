import pytest
import torch
import torch.nn.functional as F

from lmforge.config import OptimConfig
from lmforge.models import build_model, model_config
from lmforge.train.optim import build_optimizer, param_groups


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_no_weight_decay_on_norms_biases_and_embeddings(family):
    model = build_model(model_config(family, "debug"))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert decayed, "matrix weights are decayed"
    for name in decayed:
        assert "norm" not in name and "ln" not in name and "bias" not in name
        assert not name.startswith(("tok_embeddings", "wte", "wpe", "lm_head")), name
    # every trainable parameter is in exactly one group (tied weights once)
    all_ids = [id(p) for g in (decay, no_decay) for p in g["params"]]
    assert sorted(all_ids) == sorted({id(p) for p in model.parameters()})


@pytest.mark.parametrize("name", ["adamw", "adam", "sgd", "adagrad", "adafactor"])
def test_every_optimizer_lowers_the_loss(name):
    torch.manual_seed(0)
    model = build_model(model_config("llama", "debug"))
    lr = {"sgd": 0.5, "adagrad": 0.05, "adafactor": 0.01}.get(name, 3e-3)
    optimizer = build_optimizer(model, OptimConfig(name=name, lr=lr, nesterov=name == "sgd"), "cpu")
    tokens = torch.randint(0, model.cfg.vocab_size, (4, 33))

    def loss() -> torch.Tensor:
        return F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())

    first = loss().item()
    for _ in range(15):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    assert loss().item() < first - 0.3, name


@pytest.mark.parametrize(("family", "head"), [("gpt2", "lm_head"), ("llama", "output")])
def test_tied_head_on_a_pipeline_stage_is_not_decayed(family, head):
    """A last pipeline stage holds the tied head without the embedding; it must not be decayed."""
    model = build_model(
        model_config(family, "debug", **({"tie_embeddings": True} if family == "llama" else {}))
    )
    model.tok_embeddings = model.wte = None  # what a last stage looks like
    decay, _ = param_groups(model, 0.1)
    assert all(p is not getattr(model, head).weight for p in decay["params"])

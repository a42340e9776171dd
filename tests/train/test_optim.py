import copy

import pytest
import torch
import torch.nn.functional as F

from lmforge.config import OptimConfig
from lmforge.models import build_model, model_config
from lmforge.train.optim import build_optimizer, muon_groups, param_groups


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


@pytest.mark.parametrize("name", ["adamw", "adam", "sgd", "adagrad", "adafactor", "muon"])
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


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_muon_takes_the_block_matrices_and_adamw_the_rest(family):
    model = build_model(model_config(family, "debug"))
    names = {id(p): n for n, p in model.named_parameters()}
    hidden, other, no_decay = muon_groups(model, 0.1)
    assert hidden["muon"] and all(p.ndim == 2 for p in hidden["params"])
    in_blocks = {n for n, p in model.named_parameters() if p.ndim == 2 and n.startswith(("layers.", "h."))}
    assert {names[id(p)] for p in hidden["params"]} == in_blocks
    assert all(not names[id(p)].startswith(("layers.", "h.")) for p in other["params"])  # the untied head
    every = [id(p) for g in (hidden, other, no_decay) for p in g["params"]]
    assert sorted(every) == sorted({id(p) for p in model.parameters()})


def test_muon_is_torch_muon_for_the_matrices_and_adamw_for_the_rest():
    """One MuonAdamW step == torch.optim.Muon (AdamW-matched LR) + torch.optim.AdamW, bit for bit."""
    torch.manual_seed(0)
    model = build_model(model_config("llama", "debug"))
    reference = copy.deepcopy(model)
    ours = build_optimizer(model, OptimConfig(name="muon", lr=3e-3), "cpu")
    hidden, *rest = muon_groups(reference, 0.1)
    theirs = [
        torch.optim.Muon(
            hidden["params"], lr=3e-3, weight_decay=0.1, momentum=0.95, adjust_lr_fn="match_rms_adamw"
        ),
        torch.optim.AdamW(rest, lr=3e-3, betas=(0.9, 0.95), eps=1e-8),
    ]
    tokens = torch.randint(0, model.cfg.vocab_size, (4, 33))
    for _ in range(3):
        for net, optimizers in ((model, [ours]), (reference, theirs)):
            F.cross_entropy(net(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten()).backward()
            for optimizer in optimizers:
                optimizer.step()
                optimizer.zero_grad()
    for (name, mine), theirs_param in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert torch.equal(mine, theirs_param), name
    torch.manual_seed(0)
    untrained = build_model(model_config("llama", "debug"))
    assert not torch.equal(model.layers["0"].attention.wq.weight, untrained.layers["0"].attention.wq.weight)

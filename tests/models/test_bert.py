"""The BERT-style encoder: bidirectional attention, the padding mask, packed documents, the tied
masked-LM head, and its sizes; with learned and with rotary positions."""

from __future__ import annotations

import pytest
import torch

from lmforge.models import build_model, model_config

POSITIONS = pytest.mark.parametrize("positions", ["learned", "rotary"])


def debug_bert(positions: str = "learned"):
    torch.manual_seed(0)
    model = build_model(model_config("bert", "debug", positions=positions), "cpu").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name and "ln_" not in name:
                p.normal_(0.0, 0.3)  # far from uniform outputs: a leak would show
    return model


@POSITIONS
def test_attention_is_bidirectional(positions):
    model = debug_bert(positions)
    ids = torch.randint(3, 512, (1, 12), generator=torch.Generator().manual_seed(1))
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % 512
    with torch.no_grad():
        assert (model(ids)[0, 0] - model(changed)[0, 0]).abs().max() > 1e-3  # the first sees the last


@POSITIONS
def test_padding_changes_nothing_for_the_tokens(positions):
    model = debug_bert(positions)
    ids = torch.randint(3, 512, (1, 10), generator=torch.Generator().manual_seed(2))
    padded = torch.cat([ids, torch.full((1, 6), 2)], dim=1)
    pad_mask = torch.cat([torch.ones(1, 10), torch.zeros(1, 6)], dim=1).bool()
    with torch.no_grad():
        alone = model(ids)
        assert (
            model(padded, pad_mask=pad_mask)[0, :10] - alone[0]
        ).abs().max() < 1e-4  # logits of size ~5: fp32 rounding
        assert (model(padded)[0, :10] - alone[0]).abs().max() > 1e-3  # without the mask the pads are seen
        hidden = model.hidden_states(padded, pad_mask)
        assert hidden.shape == (1, 16, 64)


@POSITIONS
def test_packed_documents_see_only_themselves(positions):
    model = debug_bert(positions)
    a, b = (torch.randint(3, 512, (1, n), generator=torch.Generator().manual_seed(n)) for n in (7, 9))
    row = torch.cat([a, b], dim=1)
    doc_ids = torch.tensor([[0] * 7 + [1] * 9])
    with torch.no_grad():
        packed = model(row, doc_ids=doc_ids)
        assert (packed[0, :7] - model(a)[0]).abs().max() < 1e-4  # logits of size ~5: fp32 rounding
        assert (packed[0, 7:] - model(b)[0]).abs().max() < 1e-4  # logits of size ~5: fp32 rounding


def test_the_head_is_tied_and_the_base_shape_is_berts():
    model = build_model(model_config("bert", "debug"), "cpu")
    assert model.output.weight is model.tok_embeddings.weight
    base = build_model(model_config("bert", "base"), "meta")
    # BERT-base is 110M with its 30,522-token vocabulary, segment embeddings and pooler; ours has
    # neither of the last two and a 30,528-token vocabulary.
    assert 108_000_000 < base.num_params() < 111_000_000
    ids = torch.randint(0, 512, (2, 8))
    targets = torch.full((2, 8), -100)
    targets[:, 3] = ids[:, 3]
    loss = model(ids, targets=targets)
    want = torch.nn.functional.cross_entropy(model(ids)[:, 3], ids[:, 3])
    assert torch.allclose(loss, want, atol=1e-5)


def test_rotary_positions_have_no_table_and_see_order():
    """Rotary positions replace the learned table (the only difference in parameters) with RoPE's
    tables; a token's logits still depend on the order of the others (not a bag of words)."""
    from lmforge.models.rope import rope_tables

    model = debug_bert("rotary")
    assert model.pos_embeddings is None and "pos_embeddings.weight" not in model.state_dict()
    learned = build_model(model_config("bert", "debug"), "meta")
    assert learned.num_params() - model.num_params() == model.cfg.max_seq_len * model.cfg.dim
    cos, sin = rope_tables(
        model.cfg.head_dim, model.cfg.max_seq_len, model.cfg.rope_theta, torch.device("cpu")
    )
    assert torch.equal(model.rope_cos, cos) and torch.equal(model.rope_sin, sin)
    ids = torch.randint(3, 512, (1, 12), generator=torch.Generator().manual_seed(3))
    swapped = ids.clone()
    swapped[0, [4, 9]] = ids[0, [9, 4]]
    with torch.no_grad():
        assert (model(ids)[0, 0] - model(swapped)[0, 0]).abs().max() > 1e-3  # order is seen


def test_rotary_positions_are_relative():
    """With rotary positions only distances count: the same text after 5 masked-out pads gives
    the same hidden states; with learned positions, where each position has its own vector, not."""
    ids = torch.randint(3, 512, (1, 10), generator=torch.Generator().manual_seed(5))
    shifted = torch.cat([torch.full((1, 5), 2), ids], dim=1)
    pad_mask = torch.cat([torch.zeros(1, 5), torch.ones(1, 10)], dim=1).bool()
    for positions, same in (("rotary", True), ("learned", False)):
        model = debug_bert(positions)
        with torch.no_grad():
            gap = (model.hidden_states(shifted, pad_mask)[0, 5:] - model.hidden_states(ids)[0]).abs().max()
        assert (gap < 1e-4) == same, (positions, gap)


def test_the_masked_lm_loss_gathers_only_the_chosen_positions():
    """Only the positions with a target reach the output matmul (its FLOPs scale with them), and
    the loss is the plain cross-entropy of those positions."""
    from torch.utils.flop_counter import FlopCounterMode

    model = debug_bert("rotary")
    ids = torch.randint(3, 512, (2, 10), generator=torch.Generator().manual_seed(4))
    every = ids.clone()
    two = torch.full((2, 10), -100)
    two[0, 2], two[1, 7] = ids[0, 2], ids[1, 7]
    flops = {}
    with torch.no_grad():
        for name, targets in (("every", every), ("two", two)):
            with FlopCounterMode(display=False) as counter:
                model(ids, targets=targets)
            flops[name] = counter.get_total_flops()
        want = torch.nn.functional.cross_entropy(model(ids)[two != -100], two[two != -100])
        assert torch.allclose(model(ids, targets=two), want, atol=1e-5)
    dim, vocab = model.cfg.dim, model.cfg.vocab_size
    assert flops["every"] - flops["two"] == 2 * (20 - 2) * dim * vocab  # 18 rows fewer in the head


HEAD_GRADIENT_CASES = ["fused, own rows", "fused, rows given", "logits, rows given", "compiled"]


@pytest.mark.parametrize("case", HEAD_GRADIENT_CASES)
def test_the_masked_lm_gradient_reaches_only_the_head_rows_of_the_batchs_tokens(case):
    """head_gradient=batch: a token that is neither an input nor a target gets no gradient in its
    tied embedding/head row, and the loss is the same; with head_gradient=all every row gets one.
    The rows: the model's own (idx and targets), or the objective's (head_rows), in the fused loss,
    through the logits, and under torch.compile."""
    from lmforge.models.bert.model import tokens_in_batch
    from lmforge.ops.cross_entropy import cross_entropy

    ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(5))
    targets = torch.full((2, 12), -100)
    targets[0, 3], targets[1, 8] = 300, 301  # targets that are not inputs: their rows must learn
    rows = tokens_in_batch(ids, targets, 512)
    assert rows.sum() == len(set(ids.flatten().tolist())) + 2 and rows[[300, 301]].all()
    grads, losses = {}, {}
    for head_gradient in ("batch", "all"):
        torch.manual_seed(0)
        model = build_model(model_config("bert", "debug", head_gradient=head_gradient), "cpu")
        if case == "compiled":
            model = torch.compile(model, backend="aot_eager")
        if case == "logits, rows given":
            losses[head_gradient] = cross_entropy(model(ids, head_rows=rows), targets)
        else:
            head_rows = rows if case == "fused, rows given" else None
            losses[head_gradient] = model(ids, targets=targets, head_rows=head_rows)
        losses[head_gradient].backward()
        grads[head_gradient] = model.tok_embeddings.weight.grad.abs().sum(dim=1)  # (V,)
    assert torch.allclose(losses["batch"], losses["all"])
    assert (grads["batch"][~rows] == 0).all() and (grads["batch"][rows] > 0).all()
    assert (grads["all"][~rows] > 0).all()
    assert torch.allclose(grads["batch"][rows], grads["all"][rows])


def test_positions_must_be_learned_or_rotary():
    with pytest.raises(ValueError, match="positions must be 'learned' or 'rotary'"):
        model_config("bert", "debug", positions="sinusoidal")

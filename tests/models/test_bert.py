"""The BERT-style encoder: bidirectional attention, the padding mask, packed documents, the tied
masked-LM head, and its sizes."""

from __future__ import annotations

import torch

from lmforge.models import build_model, model_config


def debug_bert():
    torch.manual_seed(0)
    model = build_model(model_config("bert", "debug"), "cpu").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name and "ln_" not in name:
                p.normal_(0.0, 0.3)  # far from uniform outputs: a leak would show
    return model


def test_attention_is_bidirectional():
    model = debug_bert()
    ids = torch.randint(3, 512, (1, 12), generator=torch.Generator().manual_seed(1))
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % 512
    with torch.no_grad():
        assert (model(ids)[0, 0] - model(changed)[0, 0]).abs().max() > 1e-3  # the first sees the last


def test_padding_changes_nothing_for_the_tokens():
    model = debug_bert()
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


def test_packed_documents_see_only_themselves():
    model = debug_bert()
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

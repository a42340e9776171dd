"""Packed documents (doc_ids): each example in a packed row gets exactly the logits it gets alone."""

from __future__ import annotations

import pytest
import torch

from lmforge.models import build_model, model_config
from lmforge.models.packing import document_mask, document_positions


def test_positions_restart_and_the_mask_stays_inside_each_document():
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 2], [5, 5, 5, 5, 5, 5]])
    assert document_positions(doc_ids).tolist() == [[0, 1, 2, 0, 1, 0], list(range(6))]
    mask = document_mask(doc_ids)
    assert mask.shape == (2, 1, 6, 6)
    assert mask[0, 0, 4].tolist() == [False, False, False, True, True, False]  # doc 1, second token
    assert torch.equal(mask[1, 0], torch.ones(6, 6, dtype=torch.bool).tril())  # one document: causal


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_packed_row_gives_each_document_its_own_logits(family):
    torch.manual_seed(0)
    model = build_model(model_config(family, "debug"), "cpu").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)  # far from uniform logits: leaking attention would show
    lengths = [5, 9, 7]
    docs = [torch.randint(3, 512, (n,), generator=torch.Generator().manual_seed(n)) for n in lengths]
    row = torch.cat([*docs, torch.full((3,), 2)])[None]  # (1, 24): three documents and padding
    doc_ids = torch.cat([torch.full((n,), i) for i, n in enumerate([*lengths, 3])])[None]
    with torch.no_grad():
        packed = model(row, doc_ids=doc_ids)[0]
        start = 0
        for doc in docs:
            alone = model(doc[None])[0]
            assert (packed[start : start + len(doc)] - alone).abs().max() < 1e-5
            start += len(doc)
        # Without doc_ids the second document sees the first: its logits differ.
        assert (model(row)[0, 5:14] - packed[5:14]).abs().max() > 1e-2
        # The fused loss takes doc_ids too, and ignores the -100 targets.
        targets = torch.cat([row[0, 1:], torch.tensor([2])])[None].clone()
        targets[0, 21:] = -100
        logits = model(row, doc_ids=doc_ids)
        want = torch.nn.functional.cross_entropy(logits[0, :21], targets[0, :21])
        assert torch.allclose(model(row, targets=targets, doc_ids=doc_ids), want, atol=1e-5)

"""The fused linear cross-entropy equals the plain loss of the full logits: value and gradients."""

from __future__ import annotations

import pytest
import torch

from lmforge.ops.cross_entropy import IGNORE_INDEX, cross_entropy, linear_cross_entropy


def reference(hidden, weight, targets):
    return cross_entropy(hidden @ weight.t(), targets)


@pytest.mark.parametrize("only_counted", [False, True], ids=["all-rows", "counted-rows-gathered"])
@pytest.mark.parametrize("ignored", [False, True], ids=["every-target", "some-ignored"])
@pytest.mark.parametrize("chunk_size", [1, 7, 64, 4096])
def test_loss_and_gradients_match_the_plain_loss(chunk_size, ignored, only_counted):
    torch.manual_seed(0)
    hidden = torch.randn(3, 21, 16, requires_grad=True)  # (B, T, D)
    weight = torch.randn(50, 16, requires_grad=True)  # (V, D)
    targets = torch.randint(0, 50, (3, 21))
    if ignored:  # a prompt's positions, a padded tail: no loss, no gradient, not in the mean
        targets[0, :9] = IGNORE_INDEX
        targets[2, 15:] = IGNORE_INDEX

    want = reference(hidden, weight, targets)
    want_grads = torch.autograd.grad(2.5 * want, (hidden, weight))
    got = linear_cross_entropy(hidden, weight, targets, chunk_size=chunk_size, only_counted=only_counted)
    got_grads = torch.autograd.grad(2.5 * got, (hidden, weight))  # a non-unit upstream gradient

    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)


def test_float32_and_a_tied_weight():
    """fp32 at realistic scale; the head weight is the embedding's, used twice in the graph."""
    torch.manual_seed(1)
    embedding = torch.nn.Embedding(300, 32)
    tokens = torch.randint(0, 300, (4, 65))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    def loss_of(fn):
        embedding.zero_grad()
        hidden = torch.tanh(embedding(inputs))  # (B, T, D)
        loss = fn(hidden, embedding.weight, targets)
        loss.backward()
        return loss.detach(), embedding.weight.grad.clone()

    want, want_grad = loss_of(reference)
    got, got_grad = loss_of(lambda h, w, t: linear_cross_entropy(h, w, t, chunk_size=100))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-4, atol=1e-6)


def test_bfloat16_autocast_tracks_the_plain_loss():
    torch.manual_seed(2)
    hidden = torch.randn(256, 64, requires_grad=True)
    weight = torch.randn(1000, 64, requires_grad=True)
    targets = torch.randint(0, 1000, (256,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = cross_entropy(torch.nn.functional.linear(hidden, weight)[None], targets[None])
        got = linear_cross_entropy(hidden.bfloat16(), weight, targets, chunk_size=64)
    assert got.dtype == torch.float32
    assert abs(got.item() - want.item()) < 1e-2 * want.item()
    got.backward()
    assert weight.grad.dtype == torch.float32 and torch.isfinite(weight.grad).all()


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
def test_gradients_come_back_in_the_inputs_dtypes(weight_dtype):
    """bf16 hidden states (the compute dtype) and an fp32 or bf16 head: each gradient has its
    input's dtype, and both track the fp32 reference."""
    torch.manual_seed(4)
    hidden32, weight32 = torch.randn(96, 32), torch.randn(200, 32) * 0.5
    targets = torch.randint(0, 200, (96,))
    hidden = hidden32.bfloat16().requires_grad_()
    weight = weight32.to(weight_dtype, copy=True).requires_grad_()
    got = linear_cross_entropy(hidden, weight, targets, chunk_size=40)
    (3.0 * got).backward()
    assert got.dtype == torch.float32
    assert hidden.grad.dtype == torch.bfloat16 and weight.grad.dtype == weight_dtype
    ref_hidden, ref_weight = hidden32.clone().requires_grad_(), weight32.clone().requires_grad_()
    (3.0 * reference(ref_hidden[None], ref_weight, targets[None])).backward()
    torch.testing.assert_close(hidden.grad.float(), ref_hidden.grad, rtol=0.05, atol=2e-3)
    torch.testing.assert_close(weight.grad.float(), ref_weight.grad, rtol=0.05, atol=2e-3)


def test_the_bf16_hidden_gradient_is_scaled_in_fp32():
    """1/N is not a bf16 number for N = 3: the backward scales the stored bf16 gradient by it in
    fp32 and rounds once; it does not round 1/3 to bf16 first."""
    torch.manual_seed(5)
    hidden = torch.randn(3, 16).bfloat16().requires_grad_()
    weight = torch.randn(40, 16)
    targets = torch.tensor([1, 7, 30])
    linear_cross_entropy(hidden, weight, targets).backward()
    # The forward's stored gradient of the summed loss, with the same ops in the same dtypes:
    weight_c = weight.to(torch.bfloat16)
    logits = (hidden.detach() @ weight_c.t()).float()
    grad_logits = torch.softmax(logits, dim=-1)
    grad_logits[torch.arange(3), targets] -= 1.0
    summed = grad_logits.to(torch.bfloat16) @ weight_c  # (3, 16) bf16
    assert torch.equal(hidden.grad, (summed.float() / 3).to(torch.bfloat16))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bfloat16_on_cuda_matches_the_plain_loss_and_its_gradients():
    torch.manual_seed(3)
    hidden = torch.randn(8192, 768, device="cuda", requires_grad=True)
    weight = (0.02 * torch.randn(50304, 768, device="cuda")).requires_grad_()
    targets = torch.randint(0, 50304, (8192,), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        want = cross_entropy(torch.nn.functional.linear(hidden, weight)[None], targets[None])
    want_grads = torch.autograd.grad(want, (hidden, weight))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = linear_cross_entropy(hidden, weight, targets, chunk_size=2048)
    got_grads = torch.autograd.grad(got, (hidden, weight))
    torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g.float(), w.float(), rtol=5e-2, atol=1e-5)


def test_every_tensor_stays_on_the_inputs_device():
    """The meta device stands in for a GPU here: a tensor made on the default device (the CPU)
    instead of the inputs' shows up as a CPU tensor, or as an error where it meets a meta one."""
    hidden = torch.randn(2, 8, 16, device="meta", requires_grad=True)
    weight = torch.randn(40, 16, device="meta", requires_grad=True)
    targets = torch.randint(0, 40, (2, 8), device="meta")
    loss = linear_cross_entropy(hidden, weight, targets)
    assert loss.device.type == "meta" and loss.shape == ()
    loss.backward()
    assert hidden.grad.device.type == "meta" and weight.grad.device.type == "meta"
    assert weight.grad.dtype == torch.float32


def test_a_frozen_head_gets_no_gradient_and_the_hidden_state_the_same_one():
    """Fine-tuning with a frozen head (LoRA, freeze.*): its (V, D) gradient is not computed at all."""
    torch.manual_seed(2)
    hidden = torch.randn(2, 9, 16, requires_grad=True)
    weight = torch.randn(40, 16)  # requires_grad False
    targets = torch.randint(0, 40, (2, 9))
    loss = linear_cross_entropy(hidden, weight, targets, chunk_size=5)
    (grad,) = torch.autograd.grad(loss, hidden)
    (want,) = torch.autograd.grad(reference(hidden, weight, targets), hidden)
    torch.testing.assert_close(grad, want, rtol=1e-5, atol=1e-7)
    with torch.no_grad():  # evaluation: the loss alone
        torch.testing.assert_close(
            linear_cross_entropy(hidden, weight, targets), reference(hidden, weight, targets)
        )


def test_a_micro_batch_without_targets_has_zero_loss_and_gradient_not_nan():
    """SFT can cut an example's prompt before its answer: no target at all in a micro-batch."""
    hidden = torch.randn(2, 5, 8, requires_grad=True)
    weight = torch.randn(30, 8, requires_grad=True)
    targets = torch.full((2, 5), IGNORE_INDEX)
    for loss in (
        linear_cross_entropy(hidden, weight, targets),
        linear_cross_entropy(hidden, weight, targets, only_counted=True),
        reference(hidden, weight, targets),
    ):
        grads = torch.autograd.grad(loss, (hidden, weight))
        assert loss.item() == 0.0 and all(torch.equal(g, torch.zeros_like(g)) for g in grads)

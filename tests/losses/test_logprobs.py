"""Chunked log-probs equal the plain full-logits computation, values and gradients."""

import math

import pytest
import torch

from lft.losses.logprobs import linear_logprobs, logprobs_from_logits, shifted_logprobs
from lft.losses.sft import masked_nll


def naive(hidden, weight, bias, labels):
    logits = hidden @ weight.t() + (bias if bias is not None else 0)
    return logprobs_from_logits(logits, labels)


@pytest.mark.parametrize("train_head", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("chunk", [1, 3, 1000])
def test_chunked_matches_naive(train_head, with_bias, chunk):
    torch.manual_seed(0)
    B, T, H, V = 3, 7, 8, 11
    hidden = torch.randn(B, T, H, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, H, dtype=torch.float64, requires_grad=train_head)
    bias = torch.randn(V, dtype=torch.float64, requires_grad=train_head) if with_bias else None
    labels = torch.randint(0, V, (B, T))
    labels[0, :3] = -100
    labels[2, 5:] = -100
    upstream = torch.randn(B, T - 1, dtype=torch.float64)

    got, mask = shifted_logprobs(hidden, weight, labels, bias, chunk)
    want, want_mask = naive(hidden, weight, bias, labels)
    assert torch.equal(mask, want_mask)
    assert torch.allclose(got, want.to(got.dtype), atol=1e-6)

    params = [hidden] + ([weight] + ([bias] if bias is not None else []) if train_head else [])
    g_got = torch.autograd.grad((got * upstream).sum(), params)
    g_want = torch.autograd.grad((want * upstream).sum(), params)
    for a, b in zip(g_got, g_want):
        assert torch.allclose(a, b, atol=1e-6)


def test_gradcheck_frozen_and_trained_head():
    torch.manual_seed(1)
    hidden = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([0, 3, 2, 2, 1])
    frozen = torch.randn(6, 4, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda h: linear_logprobs(h, frozen, targets, chunk=2), (hidden,))
    trained = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda h, w: linear_logprobs(h, w, targets, chunk=2), (hidden, trained))


def test_hand_worked_value():
    """hidden = [1, 0], weight rows e1, e2, 0 -> logits [1, 0, 0].
    log softmax at target 0 = 1 - log(e + 2) = 1 - log(4.71828) = -0.55144."""
    hidden = torch.tensor([[1.0, 0.0]])
    weight = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    value = linear_logprobs(hidden, weight, torch.tensor([0]))
    assert value.item() == pytest.approx(1 - math.log(math.e + 2), abs=1e-6)


def test_masked_nll_hand_worked():
    """Token log-probs -1, -2 (trained) and -10 (masked): mean NLL = (1 + 2) / 2 = 1.5.
    Its gradient on each trained log-prob is -1/2 (raising a log-prob lowers the loss)."""
    logps = torch.tensor([[-1.0, -2.0, -10.0]], requires_grad=True)
    mask = torch.tensor([[True, True, False]])
    loss = masked_nll(logps, mask)
    assert loss.item() == pytest.approx(1.5)
    loss.backward()
    assert logps.grad.tolist() == [[-0.5, -0.5, 0.0]]


def test_autocast_bf16_close_to_fp32():
    torch.manual_seed(0)
    hidden = torch.randn(2, 6, 16, requires_grad=True)
    weight = torch.randn(40, 16)
    labels = torch.randint(0, 40, (2, 6))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, _ = shifted_logprobs(hidden, weight, labels, chunk=4)
    want, _ = naive(hidden, weight, None, labels)
    assert got.dtype == torch.float32
    assert torch.allclose(got, want, atol=0.15)


@pytest.mark.parametrize("frozen", [True, False])
def test_entropy_comes_with_the_log_probs_from_the_same_logits(frozen):
    """linear_logprobs(entropy=True) gives the log-probs and gradients of the plain call, and the
    entropy of each row's softmax over the full logits."""
    from lft.losses.logprobs import entropy_from_logits, linear_logprobs

    torch.manual_seed(0)
    hidden = torch.randn(7, 5, requires_grad=True)
    weight = torch.randn(11, 5, requires_grad=not frozen)
    targets = torch.randint(0, 11, (7,))
    plain = linear_logprobs(hidden, weight, targets, chunk=3)
    grads = torch.autograd.grad(plain.sum(), [hidden] + ([] if frozen else [weight]))
    logps, entropy = linear_logprobs(hidden, weight, targets, chunk=3, entropy=True)
    both = torch.autograd.grad(logps.sum(), [hidden] + ([] if frozen else [weight]))
    torch.testing.assert_close(logps, plain)
    for a, b in zip(grads, both):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(entropy, entropy_from_logits(hidden.detach() @ weight.detach().t()))
    assert not entropy.requires_grad

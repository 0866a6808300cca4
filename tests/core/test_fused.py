"""The fused SwiGLU MLP: bit-for-bit the values and gradients of the module it replaces, with a
third less saved for the backward pass."""

import copy

import pytest
import torch

from lft.model.fused import fuse_swiglu, swiglu
from lft.plugin.testing import build_model, build_tokenizer


def saved_bytes(fn):
    """Bytes of the distinct non-parameter tensors autograd saves while ``fn`` runs."""
    seen = {}

    def pack(t):
        seen.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, seen


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_matches_the_unfused_product_and_its_gradients(dtype):
    torch.manual_seed(0)
    gate = torch.randn(5, 7, dtype=dtype, requires_grad=True)
    up = torch.randn(5, 7, dtype=dtype, requires_grad=True)
    grad = torch.randn(5, 7, dtype=dtype)
    fused = swiglu(gate, up)
    fused_grads = torch.autograd.grad(fused, (gate, up), grad)
    plain = torch.nn.functional.silu(gate) * up
    plain_grads = torch.autograd.grad(plain, (gate, up), grad)
    assert torch.equal(fused, plain)
    for a, b in zip(fused_grads, plain_grads):
        assert torch.equal(a, b)
    # silu'(0) = 0.5: at gate 0, up 2, the gradients are (2 * 0.5, silu(0)) = (1, 0)
    g0, u0 = torch.zeros(1, requires_grad=True), torch.full((1,), 2.0, requires_grad=True)
    assert [float(x) for x in torch.autograd.grad(swiglu(g0, u0), (g0, u0))] == [1.0, 0.0]


def test_a_fused_model_trains_like_the_original_and_saves_less():
    model = build_model(build_tokenizer(), layers=2).train()
    fused = copy.deepcopy(model)
    assert fuse_swiglu(fused) == 2 and fuse_swiglu(fused) == 0  # every MLP once
    ids = torch.randint(0, 300, (3, 11))
    results = []
    for m in (model, fused):
        for mode in (False, True):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode):
                out, saved = saved_bytes(lambda m=m: m(input_ids=ids, labels=ids).loss)
            out.backward()
            results.append((out.detach(), [p.grad.clone() for p in m.parameters()], sum(saved.values())))
            m.zero_grad()
    for plain, fast in zip(results[:2], results[2:]):
        assert torch.equal(plain[0], fast[0])
        assert all(torch.equal(a, b) for a, b in zip(plain[1], fast[1]))
        # one (tokens x intermediate) tensor fewer per layer
        intermediate = model.config.intermediate_size
        itemsize = 4 if plain is results[0] else 2
        assert plain[2] - fast[2] == 2 * 33 * intermediate * itemsize

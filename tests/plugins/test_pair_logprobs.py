"""The concatenated chosen+rejected forward pass equals the plain per-sequence computation."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lft.data.format import pad_collate
from lft.plugins.dpo import DPOOptions
from lft.plugins.pairs import format_pair, pair_logps

from pair_rows import ROWS


@pytest.fixture(scope="module")
def setup(lft_tiny_model):
    tokenizer = AutoTokenizer.from_pretrained(lft_tiny_model)
    model = AutoModelForCausalLM.from_pretrained(lft_tiny_model).eval()
    features = [format_pair(r, tokenizer, DPOOptions(), 512, "dpo") for r in ROWS]
    return model, tokenizer, pad_collate(features, tokenizer.pad_token_id), features


def naive(model, ids, labels):
    """Full-vocabulary logits of one unpadded sequence, log-softmax, gather, sum."""
    logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
    targets = torch.tensor(labels[1:])
    scored = targets != -100
    logp = torch.log_softmax(logits.float(), -1)[scored].gather(-1, targets[scored, None]).squeeze(-1)
    return logp.sum(), int(scored.sum())


@pytest.mark.parametrize("chunk", [1, 5, 4096])
def test_chunked_concatenated_equals_naive_per_sequence(setup, chunk):
    model, tokenizer, batch, features = setup
    sums, counts = pair_logps(model, batch, tokenizer.pad_token_id, chunk)
    assert sums.shape == (4,)  # chosen rows first, then rejected rows
    expected = [
        naive(model, f[f"{side}_input_ids"], f[f"{side}_labels"]) for side in ("chosen", "rejected") for f in features
    ]
    assert torch.allclose(sums, torch.stack([e[0] for e in expected]), atol=1e-4)
    assert counts.tolist() == [e[1] for e in expected]


def test_gradients_match_naive(setup):
    model, tokenizer, batch, features = setup
    weights = torch.tensor([1.0, -2.0, 0.5, 3.0])
    params = [p for p in model.parameters()]
    sums, _ = pair_logps(model, batch, tokenizer.pad_token_id, chunk=7)
    got = torch.autograd.grad((sums * weights).sum(), params)
    naive_sums = [
        naive(model, f[f"{side}_input_ids"], f[f"{side}_labels"])[0]
        for side in ("chosen", "rejected")
        for f in features
    ]
    want = torch.autograd.grad((torch.stack(naive_sums) * weights).sum(), params)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-3)

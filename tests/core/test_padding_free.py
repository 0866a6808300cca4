"""Padding-free forward passes (``data.padding_free``) for the objectives that are not trained on
packed rows: preference pairs (chosen and rejected, and the reference's pass) and the online
methods' prompt + completion rows. Each gives the padded batch's log-probs and gradients within
float tolerance, and a run with it trains along the padded run's trajectory."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import lft
from lft.losses.logprobs import IGNORE_INDEX
from lft.model.attention import use_segment_attention
from lft.model.forward import Unpadded, completion_stats, token_logprobs, token_stats
from lft.plugin.testing import FAST

from invariance import LengthReward


@pytest.fixture(scope="module")
def model(lft_tiny_model):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(lft_tiny_model).float()
    assert use_segment_attention(model)
    return model


def padded_rows(vocab: int, left: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Three rows of 7, 12 and 4 real tokens, padded right (or left) to 12, labels on all but the first 2."""
    torch.manual_seed(1)
    lengths = [7, 12, 4]
    ids = torch.zeros(3, 12, dtype=torch.long)
    mask = torch.zeros(3, 12, dtype=torch.long)
    for i, n in enumerate(lengths):
        where = slice(12 - n, 12) if left else slice(0, n)
        ids[i, where] = torch.randint(1, vocab, (n,))
        mask[i, where] = 1
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    for i, n in enumerate(lengths):
        start = 12 - n if left else 0
        labels[i, start : start + 2] = IGNORE_INDEX
    return ids, mask, labels


def test_unpadded_puts_each_token_back_where_it_was():
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1], [1, 0, 0, 0]])
    row = Unpadded(mask)
    values = torch.arange(1, 8)[None]  # the 7 real tokens, in order
    assert row.position_ids.tolist() == [[0, 1, 2, 0, 1, 2, 0]]
    assert row.back(values).tolist() == [[1, 2, 3, 0], [0, 4, 5, 6], [7, 0, 0, 0]]
    # value j predicts token j + 1: each row's first token has no prediction of its own
    shifted = row.back_shifted(torch.arange(1, 7)[None])
    assert shifted.tolist() == [[1, 2, 0], [3, 4, 5], [0, 0, 0]]
    labels = row.labels(torch.full((3, 4), 9))
    assert labels.tolist() == [[IGNORE_INDEX, 9, 9, IGNORE_INDEX, 9, 9, IGNORE_INDEX]]


@pytest.mark.parametrize("left", [False, True], ids=["right-padded", "left-padded"])
def test_padding_free_log_probs_and_gradients_equal_the_padded_batch(model, left):
    ids, mask, labels = padded_rows(model.config.vocab_size, left)

    def run(padding_free):
        model.zero_grad(set_to_none=True)
        logps, scored = token_logprobs(model, ids, mask, labels, chunk=5, padding_free=padding_free)
        (logps.sum(-1) * torch.tensor([1.0, -2.0, 0.5])).sum().backward()
        return logps.detach(), scored, {n: p.grad.clone() for n, p in model.named_parameters()}

    logps, scored, grads = run(False)
    flat_logps, flat_scored, flat_grads = run(True)
    assert torch.equal(flat_scored, scored) and scored.sum() == 23 - 6  # the first two of each row unlabelled
    torch.testing.assert_close(flat_logps, logps, rtol=1e-5, atol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(flat_grads[name], grad, rtol=1e-4, atol=2e-5, msg=name)


def test_padding_free_completion_stats_equal_the_shared_prompt_ones(model):
    """The online rows: left-padded prompts with right-padded completions, two samples per prompt."""
    torch.manual_seed(2)
    prompt = torch.tensor([[0, 0, 5, 6, 7], [0, 0, 5, 6, 7], [8, 9, 10, 11, 12], [8, 9, 10, 11, 12]])
    prompt_mask = (prompt != 0).long()
    completion = torch.randint(1, model.config.vocab_size, (4, 6))
    completion_mask = torch.tensor([[1] * 6, [1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1] * 5 + [0]])
    ids = torch.cat([prompt, completion * completion_mask], 1)
    mask = torch.cat([prompt_mask, completion_mask], 1)
    labels = torch.cat([torch.full_like(prompt, IGNORE_INDEX), completion.masked_fill(completion_mask == 0, -100)], 1)
    groups = torch.tensor([0, 0, 1, 1])
    with torch.no_grad():
        shared = completion_stats(model, ids, mask, labels, 5, chunk=4, entropy=True, hidden=True, groups=groups)
        flat = completion_stats(
            model, ids, mask, labels, 5, chunk=4, entropy=True, hidden=True, groups=groups, padding_free=True
        )
        whole = token_stats(model, ids, mask, labels, hidden=True, padding_free=True)
    assert torch.equal(flat["mask"], shared["mask"])
    for key in ("logps", "entropy"):
        torch.testing.assert_close(flat[key], shared[key], rtol=1e-5, atol=1e-5)
    real = mask[:, 5:].bool()  # the states that predict real tokens (a padding-free pass has none for padding)
    torch.testing.assert_close(flat["hidden"][real], shared["hidden"][real], rtol=1e-4, atol=1e-5)
    assert whole["hidden"].shape == (*ids.shape, model.config.hidden_size)


def test_auto_drops_the_padding_of_batches_that_are_mostly_padding():
    from lft.data.packing import drops_padding

    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])  # 1/8 padding
    assert not drops_padding("auto", mask) and drops_padding(True, mask) and not drops_padding(False, mask)
    assert drops_padding("auto", torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]]))  # 3/8 padding
    assert drops_padding("auto", lengths=[10, 3, 2]) and not drops_padding("auto", lengths=[10, 9])


def trajectory(lft_tiny_model, data, tmp_path, name, plugins, *extra):
    """The per-step losses of a short run (an online run is rewarded by its completions' lengths,
    which a tiny random model varies, where an exact answer would score 0 throughout)."""
    overrides = dict(item.split("=", 1) for item in [*FAST, *extra])
    config = {
        "model.path": str(lft_tiny_model),
        "data.train": str(data),
        "plugins": plugins,
        "output": str(tmp_path / name),
        "trainer.max_steps": 4,
        "trainer.batch_size": 4,
        "trainer.lr": 5e-3,
        "guards.enabled": False,
        **overrides,
    }
    online = "grpo" in plugins
    result = lft.run(config, plugins=[LengthReward()] if online else [], quiet=True)
    return [h["loss"] for h in result.history]


@pytest.mark.parametrize("method", ["dpo", "grpo"])
def test_a_padding_free_run_trains_along_the_padded_runs_trajectory(
    tmp_path, lft_tiny_model, lft_pref_data, lft_prompt_data, method
):
    data = lft_pref_data["train"] if method == "dpo" else lft_prompt_data["train"]
    plugins = [method, "lora"]
    extra = ["grpo.num_generations=2", "grpo.max_new_tokens=8", "trainer.eval_every=0"] if method == "grpo" else []
    padded = trajectory(lft_tiny_model, data, tmp_path, "padded", plugins, *extra, "data.padding_free=false")
    flat = trajectory(lft_tiny_model, data, tmp_path, "flat", plugins, *extra, "data.padding_free=true")
    assert len(flat) == len(padded) == 4
    assert len(set(padded)) > 1  # the losses differ from step to step: the weights moved
    torch.testing.assert_close(torch.tensor(flat), torch.tensor(padded), rtol=1e-4, atol=1e-5)

"""Tests for lft-kto, written with the fixtures lft ships for plugin authors (lft.plugin.testing)."""

import json
import math

import pytest
import torch
from lft_kto.loss import kto_loss

from lft.plugin.manager import PluginManager


def test_loss_by_hand():
    """policy logps [-1, -3], reference [-2, -2]: rewards r = [1, -1].
    Mismatched pairs: policy [-2, -2], reference [-2.5, -1.5]: KL terms [0.5, -0.5], mean 0, so z0 = 0.
    beta = 1. Desirable: v = sigmoid(1 - 0) = 0.731059. Undesirable: v = sigmoid(0 - (-1)) = 0.731059.
    loss = mean(1 - 0.731059, 1 - 0.731059) = 0.268941.
    d loss / d policy[0] = -(1/2) * sigmoid'(1) = -(1/2)(0.196612) = -0.098306: more likely good answer, lower loss.
    d loss / d policy[1] = +0.098306: more likely bad answer, higher loss."""
    policy = torch.tensor([-1.0, -3.0], requires_grad=True)
    loss, rewards, z0 = kto_loss(
        policy,
        torch.tensor([-2.0, -2.0]),
        torch.tensor([True, False]),
        torch.tensor([-2.0, -2.0]),
        torch.tensor([-2.5, -1.5]),
        beta=1.0,
    )
    assert loss.item() == pytest.approx(1 - 1 / (1 + math.exp(-1)), abs=1e-6)
    assert rewards.tolist() == [1.0, -1.0] and z0.item() == 0.0
    loss.backward()
    assert policy.grad.tolist() == pytest.approx([-0.098306, 0.098306], abs=1e-6)


def test_reference_point_is_clamped_and_weighted():
    """KL terms [2, 4] give z0 = 3. With r = [3, 3] (one good, one bad), beta = 0.5 and weights
    lambda_D = 2, lambda_U = 1: desirable v = 2 sigmoid(0) = 1, undesirable v = sigmoid(0) = 0.5,
    loss = mean(2 - 1, 1 - 0.5) = 0.75. A negative KL estimate is clamped to z0 = 0."""
    args = (torch.tensor([3.0, 3.0]), torch.tensor([0.0, 0.0]), torch.tensor([True, False]))
    loss, _, z0 = kto_loss(
        *args,
        torch.tensor([2.0, 4.0]),
        torch.tensor([0.0, 0.0]),
        beta=0.5,
        desirable_weight=2.0,
        undesirable_weight=1.0,
    )
    assert z0.item() == 3.0 and loss.item() == pytest.approx(0.75)
    _, _, z0 = kto_loss(*args, torch.tensor([-5.0, -5.0]), torch.tensor([0.0, 0.0]))
    assert z0.item() == 0.0


def test_found_through_its_entry_point():
    info = PluginManager().infos["kto"]
    assert (info.kind, info.package, info.source) == ("objective", "lft-kto", "entry point")


@pytest.fixture
def kto_data(tmp_path, lft_pref_data):
    out = {}
    for split in ("train", "eval"):
        rows = []
        for line in lft_pref_data[split].read_text().splitlines():
            pair = json.loads(line)
            # A tiny random model cannot learn arithmetic, but it can learn to prefer answering.
            rows += [
                {"prompt": pair["prompt"], "completion": pair["chosen"], "label": True},
                {"prompt": pair["prompt"], "completion": "I do not know, sorry.", "label": False},
            ]
        out[split] = tmp_path / f"kto-{split}.jsonl"
        out[split].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


@pytest.mark.parametrize("wrapper", ["lora", "full"])
def test_kto_trains(lft_run, kto_data, wrapper):
    summary = lft_run(
        "--plugin",
        "kto",
        "--plugin",
        wrapper,
        "trainer.max_steps=25",
        "trainer.lr=2e-3",
        "kto.beta=0.5",
        data=kto_data["train"],
        eval_data=kto_data["eval"],
    )
    assert (summary["objective"], summary["wrapper"]) == ("kto", wrapper)
    history = [json.loads(x) for x in (summary["output"] / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert sum(h["loss"] for h in history[-5:]) < sum(h["loss"] for h in history[:5])
    margin = [
        h["rewards/desirable"] - h["rewards/undesirable"]
        for h in history
        if "rewards/undesirable" in h and "rewards/desirable" in h
    ]
    assert sum(margin[-5:]) / 5 > 0  # good completions gained likelihood relative to bad ones


@pytest.mark.parametrize(
    "row, message",
    [
        ('{"prompt": "p", "completion": "c", "label": "yes"}', "'label' must be true or false, got 'yes'"),
        ('{"prompt": "p", "label": true}', "missing column(s) completion; KTO rows need prompt, completion, label"),
        ('{"prompt": "p", "completion": " ", "label": true}', "'completion' is empty"),
    ],
)
def test_bad_rows_are_one_line_errors(tmp_path, capsys, lft_tiny_model, row, message):
    from lft.cli.main import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text(row + "\n")
    code = main(
        [
            "run",
            "-q",
            "--plugin",
            "kto",
            "--data",
            str(bad),
            "--output",
            str(tmp_path / "o"),
            "--model",
            str(lft_tiny_model),
            "data.eval_split=0",
        ]
    )
    assert code == 2
    assert capsys.readouterr().err.strip() == f"error: {bad}:1: {message}"

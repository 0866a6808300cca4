"""Tests for lft-bco, written with the fixtures lft ships for plugin authors (lft.plugin.testing)."""

import json
import math
from types import SimpleNamespace

import pytest
import torch
from lft_bco import BCOObjective, BCOOptions
from lft_bco.loss import bco_loss, running_mean

from lft.plugin.manager import PluginManager


def test_loss_by_hand():
    """policy logps [-1, -3], reference [-2, -2], beta = 1: rewards beta * r = [1, -1]; delta = 0.
    Desirable: -log sigmoid(1 - 0) = log(1 + e^-1) = 0.313262.
    Undesirable: -log sigmoid(-(-1 - 0)) = -log sigmoid(1) = 0.313262. loss = mean = 0.313262.
    d(-log sigmoid(x))/dx = -(1 - sigmoid(x)) = -sigmoid(-x), and sigmoid(-1) = 0.268941:
    d loss / d policy[0] = (1/2)(-0.268941)(+beta) = -0.134471: a likelier good answer, a lower loss.
    d loss / d policy[1] = (1/2)(-0.268941)(-beta) = +0.134471: a likelier bad answer, a higher loss."""
    policy = torch.tensor([-1.0, -3.0], requires_grad=True)
    loss, rewards = bco_loss(policy, torch.tensor([-2.0, -2.0]), torch.tensor([True, False]), delta=0.0, beta=1.0)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-6)
    assert rewards.tolist() == [1.0, -1.0] and not rewards.requires_grad
    loss.backward()
    assert policy.grad.tolist() == pytest.approx([-0.134471, 0.134471], abs=1e-6)


def test_delta_moves_the_boundary():
    """policy [-1, -1], reference [-3, -3], beta = 0.5: rewards 0.5 * 2 = [1, 1], one good, one bad.
    delta = 1: both logits are 1 - 1 = 0, each loss -log sigmoid(0) = log 2 = 0.693147; loss = 0.693147.
    Gradients (1/2)(-sigmoid(0))(+-beta) = (1/2)(-0.5)(+-0.5) = [-0.125, +0.125]: descent still lifts the good
    answer and lowers the bad one.
    delta = 0: desirable -log sigmoid(1) = 0.313262, undesirable -log sigmoid(-1) = log(1 + e) = 1.313262,
    loss = 0.813262: a reward every completion gets is not credited once delta has caught up with it."""
    policy = torch.tensor([-1.0, -1.0], requires_grad=True)
    args = (torch.tensor([-3.0, -3.0]), torch.tensor([True, False]))
    loss, rewards = bco_loss(policy, *args, delta=1.0, beta=0.5)
    assert rewards.tolist() == [1.0, 1.0] and loss.item() == pytest.approx(math.log(2), abs=1e-6)
    loss.backward()
    assert policy.grad.tolist() == pytest.approx([-0.125, 0.125], abs=1e-6)
    loss, _ = bco_loss(policy, *args, delta=0.0, beta=0.5)
    assert loss.item() == pytest.approx(0.813262, abs=1e-6)


def test_running_mean_by_hand():
    """Four rewards adding up to -2: mean -0.5. Two more adding up to 4: (-2 + 4) / 6 = 0.333333,
    computed as -0.5 + (4 - 2 * (-0.5)) / 6. No rewards leave it as it is."""
    mean, seen = running_mean(0.0, 0, -2.0, 4)
    assert (mean, seen) == (-0.5, 4)
    mean, seen = running_mean(mean, seen, 4.0, 2)
    assert seen == 6 and mean == pytest.approx(1 / 3)
    assert running_mean(mean, seen, 0.0, 0) == (mean, seen)


def test_delta_is_kept_across_steps_and_checkpoints():
    """Rewards [1, 3] then [2]: delta = 2 over 2, then (4 + 2) / 3 = 2 over 3; a fresh objective
    loaded from the state has the same delta (what a resumed run reads from its checkpoint)."""
    objective, module = BCOObjective(BCOOptions()), SimpleNamespace(_trainer=None)
    objective.observe(module, torch.tensor([1.0, 3.0]))
    assert (objective.delta, objective.seen) == (2.0, 2)
    objective.observe(module, torch.tensor([2.0]))
    resumed = BCOObjective(BCOOptions())
    resumed.load_state_dict(objective.state_dict())
    assert (resumed.delta, resumed.seen) == (2.0, 3)


def test_found_through_its_entry_point():
    info = PluginManager().infos["bco"]
    assert (info.kind, info.package, info.source) == ("objective", "lft-bco", "entry point")


@pytest.fixture
def bco_data(tmp_path, lft_pref_data):
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
        out[split] = tmp_path / f"bco-{split}.jsonl"
        out[split].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


@pytest.mark.parametrize("wrapper", ["lora", "full"])
def test_bco_trains(lft_run, bco_data, wrapper):
    summary = lft_run(
        "--plugin",
        "bco",
        "--plugin",
        wrapper,
        "trainer.max_steps=25",
        "trainer.lr=2e-3",
        "bco.beta=0.5",
        data=bco_data["train"],
        eval_data=bco_data["eval"],
    )
    assert (summary["objective"], summary["wrapper"]) == ("bco", wrapper)
    history = [json.loads(x) for x in (summary["output"] / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert sum(h["loss"] for h in history[-5:]) < sum(h["loss"] for h in history[:5])
    margin = [h["margin"] for h in history if "margin" in h]
    assert sum(margin[-5:]) / 5 > 0  # good completions gained likelihood relative to bad ones
    assert history[0]["delta"] == 0 and history[-1]["delta"] != 0  # delta followed the rewards


@pytest.mark.parametrize(
    "row, message",
    [
        ('{"prompt": "p", "completion": "c", "label": "yes"}', "'label' must be true or false, got 'yes'"),
        ('{"prompt": "p", "label": true}', "missing column(s) completion; BCO rows need prompt, completion, label"),
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
            "bco",
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

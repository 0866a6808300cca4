"""The objective contract (lft.objective): what the engine may call on any objective, with the
defaults of an offline loss over rows, and what lft_objective may return."""

import pytest
import torch

import lft
from lft.objective import FunctionObjective, Objective, OnlineObjective, RowTexts, as_objective, units_of


def test_the_base_objective_is_an_offline_loss_over_rows_with_nothing_else():
    objective = Objective()
    assert not objective.online and not objective.steps_optimizer and not objective.needs_reference
    assert units_of(objective, {"input_ids": torch.zeros(3, 5)}) == {"rows": torch.tensor(3.0, dtype=torch.float64)}
    assert objective.measure(None, None, [], None) == {} and objective.row_texts({"text": "x"}) == RowTexts()
    assert objective.state_dict() == {} and objective.load_state_dict({}) is None
    assert dict(objective.notes) == {} and list(objective.warnings) == [] and objective.reward_metric is None
    with pytest.raises(NotImplementedError, match="must compute its loss"):
        objective(None, {})


def test_an_online_objective_steps_the_optimizer_itself():
    objective = OnlineObjective()
    assert objective.online and objective.steps_optimizer and objective.updates_per_batch == 1
    with pytest.raises(NotImplementedError, match="must update the policy"):
        objective.training_step(None, {})


def test_what_lft_objective_returns():
    class Mine(Objective):
        pass

    mine = Mine()
    assert as_objective(mine, "mine") is mine

    def loss(module, batch):
        return batch["x"].mean(), {}

    wrapped = as_objective(loss, "fn")
    assert isinstance(wrapped, FunctionObjective) and not wrapped.online
    assert wrapped(None, {"x": torch.tensor([1.0, 3.0])})[0].item() == 2.0
    assert units_of(wrapped, {"input_ids": torch.zeros(2, 4)}) == {"rows": torch.tensor(2.0, dtype=torch.float64)}
    with pytest.raises(lft.PluginError, match="'none' returned no objective from lft_objective"):
        as_objective(None, "none")
    with pytest.raises(lft.PluginError, match="'num' returned int from lft_objective; expected an lft.objective"):
        as_objective(42, "num")

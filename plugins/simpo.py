"""SimPO: simple preference optimisation with a length-normalised reward and no reference model
(Meng et al. 2024, https://arxiv.org/abs/2405.14734). The loss is in ``lft.losses.simpo``.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from lft.losses.preference import WithChosenNLL
from lft.losses.simpo import SimPOLoss
from lft.plugins.preference import Preference, PreferenceOptions


class SimPOOptions(PreferenceOptions):
    beta: float = Field(2.0, gt=0, description="Scale of the reward beta * mean token log-prob (paper: 2.0-2.5).")
    gamma: float = Field(1.0, ge=0, description="Target reward margin between chosen and rejected (paper: 0.3-1.6).")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="Assumed rate of flipped labels.")
    nll_weight: float = Field(
        0.0,
        ge=0,
        description="Add this times the chosen completions' per-token NLL (the "
        "SimPO authors' sft_weight): keeps chosen answers likely while the margin grows.",
    )


class SimPO(Preference):
    """Objective: SimPO on preference pairs (reference-free, length-normalised)."""

    name = "simpo"
    options = SimPOOptions
    #: On the embedded arithmetic pairs the pure loss lowers the chosen answers' likelihood along with the
    #: rejected ones (the task metric falls); the NLL term keeps them likely, so the demo job uses it.
    default_settings = {**Preference.default_settings, "{name}.nll_weight": 1.0}

    def loss(self, options: SimPOOptions) -> Any:
        loss = SimPOLoss(beta=options.beta, gamma=options.gamma, label_smoothing=options.label_smoothing)
        return WithChosenNLL(loss, options.nll_weight) if options.nll_weight else loss

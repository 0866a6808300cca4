"""ORPO: monolithic preference optimisation without a reference model (Hong et al. 2024,
https://arxiv.org/abs/2403.07691): the SFT loss on the chosen completion plus lambda times an
odds-ratio term that favours it over the rejected one. The loss is in ``lft.losses.orpo``.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from lft.losses.orpo import ORPOLoss
from lft.plugins.preference import Preference, PreferenceOptions


class ORPOOptions(PreferenceOptions):
    odds_ratio_weight: float = Field(
        0.1,
        ge=0,
        description="lambda in the paper: weight of the odds-ratio term next to the NLL of the chosen completion.",
    )


class ORPO(Preference):
    """Objective: ORPO on preference pairs (SFT and preference in one loss, no reference)."""

    name = "orpo"
    options = ORPOOptions

    def loss(self, options: ORPOOptions) -> Any:
        return ORPOLoss(weight=options.odds_ratio_weight)

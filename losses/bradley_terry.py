"""The Bradley-Terry pairwise loss for training a scalar reward model (RLHF stage 2;
Ouyang et al. 2022, https://arxiv.org/abs/2203.02155, eq. 1).

``-log sigmoid(r(x, y_c) - r(x, y_r) - m)``, mean over pairs, where the optional margin ``m``
says how much better the chosen answer is (Llama 2, https://arxiv.org/abs/2307.09288, sec. 3.2.2).
An optional centring term ``c * mean((r_c + r_r)^2)`` keeps rewards near zero (Eisenstein et al.
2023, https://arxiv.org/abs/2312.09244).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class BradleyTerryLoss:
    """Pairwise reward-model loss; no reference model."""

    needs_reference = False

    def __init__(self, center_coefficient: float = 0.0):
        if center_coefficient < 0:
            raise ValueError(f"the centring coefficient must be >= 0, got {center_coefficient}")
        self.center_coefficient = center_coefficient

    def __call__(
        self, chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, margin: torch.Tensor | None = None
    ) -> torch.Tensor:
        """:param chosen_rewards: scalar reward of each chosen completion, shape (B,).
        :param rejected_rewards: the same for each rejected completion.
        :param margin: optional required reward gap per pair, shape (B,).
        :return: the scalar loss."""
        diff = chosen_rewards - rejected_rewards
        if margin is not None:
            diff = diff - margin.to(diff.dtype)
        loss = -F.logsigmoid(diff).mean()
        if self.center_coefficient:
            loss = loss + self.center_coefficient * ((chosen_rewards + rejected_rewards) ** 2).mean()
        return loss

"""SimPO: simple preference optimisation (Meng et al. 2024, https://arxiv.org/abs/2405.14734).

The implicit reward is the length-normalised log-prob ``beta / |y| * log pi(y)``, and the loss asks
the chosen reward to beat the rejected one by the target margin gamma (eq. 6 of the paper):
``-log sigmoid(beta * mean_logp(y_c) - beta * mean_logp(y_r) - gamma)``. No reference model.
"""

from __future__ import annotations

import torch.nn.functional as F

from lft.losses.preference import PairLogps, PairLoss


class SimPOLoss:
    """SimPO with optional label smoothing (the cDPO form: eps of the pairs taken as flipped)."""

    needs_reference = False

    def __init__(self, beta: float = 2.0, gamma: float = 1.0, label_smoothing: float = 0.0):
        if beta <= 0:
            raise ValueError(f"beta must be positive, got {beta}")
        if not 0 <= label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
        self.beta, self.gamma, self.label_smoothing = beta, gamma, label_smoothing

    def __call__(self, logps: PairLogps) -> PairLoss:
        chosen = self.beta * logps.chosen_mean()
        rejected = self.beta * logps.rejected_mean()
        z = chosen - rejected - self.gamma
        eps = self.label_smoothing
        losses = -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
        return PairLoss(losses.mean(), chosen.detach(), rejected.detach())

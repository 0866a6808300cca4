"""CPO: contrastive preference optimisation (Xu et al. 2024, https://arxiv.org/abs/2401.08417).

A DPO-like loss with no reference model: the margin is the policy's own log-prob margin
``h = log pi(y_c) - log pi(y_r)`` (summed over each completion's tokens), and the paper adds the
chosen completion's NLL (eq. 3 with eq. 4-6). The preference term comes in three forms:

* ``sigmoid``: ``-log sigmoid(beta * h)``, with optional label smoothing (flipped labels);
* ``hinge``: ``max(0, 1 - beta * h)``;
* ``ipo``: ``(h_mean - 1 / (2 beta))^2`` on the per-token margin.

The reported rewards are ``beta * log pi(y)`` (per token for ipo); their margin is ``beta * h``.
The NLL term is ``lft.losses.preference.WithChosenNLL``.
"""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F

from lft.losses.preference import PairLogps, PairLoss

Form = Literal["sigmoid", "hinge", "ipo"]


class CPOLoss:
    """The preference term of CPO: reference-free, on the policy's own log-prob margin."""

    needs_reference = False

    def __init__(self, beta: float = 0.1, form: Form = "sigmoid", label_smoothing: float = 0.0):
        if beta <= 0:
            raise ValueError(f"beta must be positive, got {beta}")
        if form not in ("sigmoid", "hinge", "ipo"):
            raise ValueError(f"unknown CPO loss {form!r}; expected sigmoid, hinge or ipo")
        if not 0 <= label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
        if label_smoothing and form != "sigmoid":
            raise ValueError(f"label_smoothing applies to the sigmoid form, not {form}")
        self.beta, self.form, self.label_smoothing = beta, form, label_smoothing

    def __call__(self, logps: PairLogps) -> PairLoss:
        if self.form == "ipo":
            chosen, rejected = logps.chosen_mean(), logps.rejected_mean()
            losses = (chosen - rejected - 1 / (2 * self.beta)) ** 2
        else:
            chosen, rejected = logps.chosen, logps.rejected
            z = self.beta * (chosen - rejected)
            if self.form == "hinge":
                losses = F.relu(1 - z)
            else:
                eps = self.label_smoothing
                losses = -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
        return PairLoss(losses.mean(), self.beta * chosen.detach(), self.beta * rejected.detach())

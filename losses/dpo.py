"""Direct Preference Optimization and its variants: losses on the policy-to-reference log-ratio.

All four take the log-ratio margin of a pair,
``h = (log pi(y_c) - log ref(y_c)) - (log pi(y_r) - log ref(y_r))``, with log-probs summed over
each completion's tokens (averaged over them for IPO), and report the implicit rewards
``beta * (log pi(y) - log ref(y))`` in the same units. Every one of them needs the reference policy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lft.losses.preference import PairLogps, PairLoss


class _LogRatioLoss:
    """Shared by the DPO family: the log-ratios, the per-pair loss, the implicit rewards."""

    needs_reference = True
    #: Use per-token average log-probs instead of sums.
    per_token = False

    def __init__(self, beta: float = 0.1):
        if beta <= 0:
            raise ValueError(f"beta must be positive, got {beta}")
        self.beta = beta

    def pair_losses(self, h: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, logps: PairLogps) -> PairLoss:
        chosen_ratio, rejected_ratio = logps.logratios(self.per_token)
        losses = self.pair_losses(chosen_ratio - rejected_ratio)
        return PairLoss(losses.mean(), self.beta * chosen_ratio.detach(), self.beta * rejected_ratio.detach())


class DPOLoss(_LogRatioLoss):
    """DPO, sigmoid form (Rafailov et al. 2023, https://arxiv.org/abs/2305.18290):
    ``-log sigmoid(beta * h)``.

    With ``label_smoothing = eps > 0`` this is conservative DPO (cDPO, Mitchell 2023,
    https://ericmitchell.ai/cdpo.pdf), which assumes each label is flipped with probability eps:
    ``-(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)``.
    """

    def __init__(self, beta: float = 0.1, label_smoothing: float = 0.0):
        super().__init__(beta)
        if not 0 <= label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
        self.label_smoothing = label_smoothing

    def pair_losses(self, h: torch.Tensor) -> torch.Tensor:
        eps = self.label_smoothing
        return -(1 - eps) * F.logsigmoid(self.beta * h) - eps * F.logsigmoid(-self.beta * h)


class RobustDPOLoss(DPOLoss):
    """Robust DPO (Chowdhury et al. 2024, https://arxiv.org/abs/2403.00409): an unbiased loss
    under preference noise of rate eps = ``label_smoothing``:
    ``((1 - eps) * -log sigmoid(beta h) - eps * -log sigmoid(-beta h)) / (1 - 2 eps)``.
    """

    def pair_losses(self, h: torch.Tensor) -> torch.Tensor:
        eps = self.label_smoothing
        return (-(1 - eps) * F.logsigmoid(self.beta * h) + eps * F.logsigmoid(-self.beta * h)) / (1 - 2 * eps)


class IPOLoss(_LogRatioLoss):
    """IPO (Azar et al. 2023, https://arxiv.org/abs/2310.12036, eq. 17): regress the log-ratio
    margin onto ``1 / (2 tau)`` instead of pushing it to infinity: ``(h - 1 / (2 tau))^2``.
    ``tau`` plays the part of beta (and scales the reported rewards). The log-ratios are averaged
    over each completion's tokens, as the paper's authors advise, so the target does not depend
    on completion length (with sums the squared loss is unstable on long completions).
    """

    per_token = True

    def pair_losses(self, h: torch.Tensor) -> torch.Tensor:
        return (h - 1 / (2 * self.beta)) ** 2


class HingeDPOLoss(_LogRatioLoss):
    """Hinge loss on the log-ratio margin, as in SLiC-HF (Zhao et al. 2023,
    https://arxiv.org/abs/2305.10425) with the reference ratio of DPO: ``max(0, 1 - beta h)``."""

    def pair_losses(self, h: torch.Tensor) -> torch.Tensor:
        return torch.relu(1 - self.beta * h)


#: ``dpo.loss`` option value -> loss class.
VARIANTS = {"sigmoid": DPOLoss, "robust": RobustDPOLoss, "ipo": IPOLoss, "hinge": HingeDPOLoss}

"""ORPO: odds-ratio preference optimisation (Hong et al. 2024, https://arxiv.org/abs/2403.07691).

``L = NLL(chosen) + lambda * -log sigmoid(log odds(y_c) - log odds(y_r))`` where
``odds(y) = P(y) / (1 - P(y))`` and ``P(y) = exp(mean token log-prob of y)`` (eq. 4-7 of the
paper). The NLL is the mean over the chosen completions' tokens, as in supervised fine-tuning.
No reference model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lft.losses.preference import PairLogps, PairLoss, chosen_nll


def log_odds(mean_logp: torch.Tensor) -> torch.Tensor:
    """``log(P / (1 - P))`` for ``P = exp(mean_logp)``; ``log(1 - P)`` is ``log(-expm1(mean_logp))``,
    which stays accurate when P is close to 0 or to 1 (the mean is kept a hair below 0)."""
    mean_logp = mean_logp.clamp(max=-1e-6)
    return mean_logp - torch.log(-torch.expm1(mean_logp))


class ORPOLoss:
    """SFT NLL of the chosen completion plus ``weight`` (the paper's lambda) times the odds-ratio term.
    The reported rewards are each completion's log-odds; their margin is the log odds ratio."""

    needs_reference = False

    def __init__(self, weight: float = 0.1):
        if weight < 0:
            raise ValueError(f"the odds-ratio weight must be >= 0, got {weight}")
        self.weight = weight

    def __call__(self, logps: PairLogps) -> PairLoss:
        nll = chosen_nll(logps)
        chosen_odds, rejected_odds = log_odds(logps.chosen_mean()), log_odds(logps.rejected_mean())
        odds_ratio = -F.logsigmoid(chosen_odds - rejected_odds).mean()
        loss = nll + self.weight * odds_ratio
        return PairLoss(
            loss,
            chosen_odds.detach(),
            rejected_odds.detach(),
            {"nll": nll.detach(), "odds_ratio_loss": odds_ratio.detach()},
            terms={"chosen_tokens": nll, "pairs": self.weight * odds_ratio},
        )

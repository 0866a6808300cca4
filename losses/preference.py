"""What every pairwise preference loss takes and returns.

A batch holds B (prompt, chosen, rejected) triples. The losses see only per-sequence numbers:
the summed log-probability of each completion's tokens under the policy, its token count, and,
for losses that need one, the same sums under the reference policy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class PairLogps:
    """Per-sequence log-probs of a batch of preference pairs, each of shape (B,).

    :param chosen: summed log-prob of the chosen completion's tokens under the policy.
    :param rejected: the same for the rejected completion.
    :param chosen_tokens: number of tokens summed in ``chosen`` (for length-normalised losses).
    :param rejected_tokens: number of tokens summed in ``rejected``.
    :param ref_chosen: summed log-prob of the chosen completion under the reference policy, or
        None for reference-free losses.
    :param ref_rejected: the same for the rejected completion.
    """

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor
    ref_chosen: torch.Tensor | None = None
    ref_rejected: torch.Tensor | None = None

    def chosen_mean(self) -> torch.Tensor:
        """Average per-token log-prob of the chosen completion."""
        return self.chosen / self.chosen_tokens.clamp(min=1).to(self.chosen.dtype)

    def rejected_mean(self) -> torch.Tensor:
        return self.rejected / self.rejected_tokens.clamp(min=1).to(self.rejected.dtype)

    def logratios(self, per_token: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``(chosen - ref_chosen, rejected - ref_rejected)``, divided by each completion's token
        count when ``per_token``; needs the reference sums."""
        if self.ref_chosen is None or self.ref_rejected is None:
            raise ValueError("this loss needs the reference policy's log-probs (ref_chosen, ref_rejected)")
        chosen, rejected = self.chosen - self.ref_chosen, self.rejected - self.ref_rejected
        if per_token:
            chosen = chosen / self.chosen_tokens.clamp(min=1).to(chosen.dtype)
            rejected = rejected / self.rejected_tokens.clamp(min=1).to(rejected.dtype)
        return chosen, rejected


@dataclass
class PairLoss:
    """A preference loss's result.

    :param loss: the scalar to minimise (mean over the batch).
    :param chosen_rewards: the loss's implicit reward of each chosen completion, shape (B,),
        detached; the pair is ranked correctly when it exceeds ``rejected_rewards``.
    :param rejected_rewards: the same for each rejected completion.
    :param metrics: extra scalars to log (detached), e.g. ORPO's NLL term.
    :param terms: ``loss`` split by what each part is averaged over, for the step-level
        normalisation of ``lft.objective``: ``"pairs"`` (a mean over the batch's pairs) and
        ``"chosen_tokens"`` (a mean over the chosen completions' tokens, as an NLL term). Empty
        means the whole loss is a mean over pairs.
    """

    loss: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    terms: dict[str, torch.Tensor] = field(default_factory=dict)

    def by_unit(self) -> dict[str, torch.Tensor]:
        """``terms``, or ``{"pairs": loss}`` when the loss did not split itself."""
        return dict(self.terms) if self.terms else {"pairs": self.loss}


def chosen_nll(logps: PairLogps) -> torch.Tensor:
    """Mean negative log-likelihood per token of the chosen completions (as in SFT)."""
    return -logps.chosen.sum() / logps.chosen_tokens.sum().clamp(min=1).to(logps.chosen.dtype)


class WithChosenNLL:
    """A pair loss plus ``weight`` times the chosen completions' NLL, which keeps the chosen
    answers likely while the margin grows; with DPO this is RPO (Pang et al. 2024,
    https://arxiv.org/abs/2404.19733, eq. 2, the NLL normalised by length)."""

    def __init__(self, loss: object, weight: float):
        if weight < 0:
            raise ValueError(f"the NLL weight must be >= 0, got {weight}")
        self.loss, self.weight = loss, weight
        self.needs_reference = bool(getattr(loss, "needs_reference", False))

    def __call__(self, logps: PairLogps) -> PairLoss:
        out = self.loss(logps)  # type: ignore[operator]
        nll = chosen_nll(logps)
        terms = out.by_unit()
        terms["chosen_tokens"] = terms.get("chosen_tokens", 0.0) + self.weight * nll
        out.loss = out.loss + self.weight * nll
        out.terms = terms
        out.metrics = {**out.metrics, "nll": nll.detach()}
        return out

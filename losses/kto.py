"""KTO: Kahneman-Tversky Optimization (Ethayarajh et al. 2024, https://arxiv.org/abs/2402.01306).

Learns from unpaired completions, each labelled desirable or undesirable. A completion's implied
reward is ``r = log pi(y|x) - log ref(y|x)`` (summed over its tokens). The reference point ``z0``
estimates KL(pi || ref) from completions put after prompts they do not answer; it is clamped at 0
and carries no gradient (eq. 8 and section 4.1 of the paper). The value of an example is

    desirable:    lambda_D * sigmoid(beta * (r - z0))
    undesirable:  lambda_U * sigmoid(beta * (z0 - r))

and the loss is the mean over examples of ``lambda_y - value``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class KTOLoss:
    """The loss above; ``__call__`` returns ``(loss, rewards, z0)``."""

    beta: float = 0.1
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.beta <= 0:
            raise ValueError(f"beta must be positive, got {self.beta}")
        if self.desirable_weight <= 0 or self.undesirable_weight <= 0:
            raise ValueError("the desirable and undesirable weights must be positive")

    @staticmethod
    def reference_point(kl_logps: torch.Tensor, kl_ref_logps: torch.Tensor) -> torch.Tensor:
        """``z0 = max(0, mean(log pi - log ref))`` over the mismatched pairs, without gradient."""
        return (kl_logps - kl_ref_logps).detach().float().mean().clamp(min=0)

    def __call__(
        self, logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor, z0: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loss, rewards)``: the mean loss over the examples, and each one's detached reward.

        :param logps: summed completion log-probs under the policy, (B,).
        :param ref_logps: the same under the reference, (B,).
        :param desirable: bool (B,): True for a desirable completion.
        :param z0: the reference point (``reference_point``), a 0-d tensor.
        """
        rewards = logps - ref_logps
        z0 = z0.to(rewards.dtype)
        weight = torch.where(
            desirable,
            torch.full_like(rewards, self.desirable_weight),
            torch.full_like(rewards, self.undesirable_weight),
        )
        margin = torch.where(desirable, rewards - z0, z0 - rewards)
        losses = weight * (1 - torch.sigmoid(self.beta * margin))
        return losses.mean(), rewards.detach()

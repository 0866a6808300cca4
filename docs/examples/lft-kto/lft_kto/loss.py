"""The KTO loss (Ethayarajh et al., 2024, "KTO: Model Alignment as Prospect Theoretic
Optimization", arXiv 2402.01306). Pure tensor math.

For a completion y of prompt x, the implied reward is r = log pi(y|x) - log pi_ref(y|x). A
reference point z0 estimates KL(pi || pi_ref) from completions paired with the wrong prompt,
clamped at 0 and not differentiated. The value of an example is

    desirable:    v = lambda_d * sigmoid(beta * (r - z0))
    undesirable:  v = lambda_u * sigmoid(beta * (z0 - r))

and the loss is the mean of lambda_y - v over the batch.
"""

from __future__ import annotations

import torch


def kto_loss(
    policy_logps: torch.Tensor,
    reference_logps: torch.Tensor,
    desirable: torch.Tensor,
    kl_policy_logps: torch.Tensor,
    kl_reference_logps: torch.Tensor,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return ``(loss, rewards, z0)``.

    :param policy_logps: summed completion log-probs under the policy, shape (B,).
    :param reference_logps: the same under the reference, shape (B,).
    :param desirable: bool, shape (B,): True for a good completion.
    :param kl_policy_logps: summed log-probs of mismatched prompt/completion pairs, policy, (B,).
    :param kl_reference_logps: the same under the reference, (B,).
    """
    rewards = policy_logps - reference_logps
    z0 = (kl_policy_logps - kl_reference_logps).mean().clamp(min=0).detach()
    weight = torch.where(
        desirable, torch.full_like(rewards, desirable_weight), torch.full_like(rewards, undesirable_weight)
    )
    margin = torch.where(desirable, rewards - z0, z0 - rewards)
    loss = (weight - weight * torch.sigmoid(beta * margin)).mean()
    return loss, rewards.detach(), z0

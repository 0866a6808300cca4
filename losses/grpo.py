"""GRPO: group-relative policy optimisation, with the token normalisations of its variants.

* GRPO: Shao et al. 2024, DeepSeekMath, arXiv 2402.03300 (and DeepSeek-R1, arXiv 2501.12948).
* Dr. GRPO: Liu et al. 2025, "Understanding R1-Zero-Like Training", arXiv 2503.20783.
* DAPO: Yu et al. 2025, arXiv 2503.14476 (token-level loss, clip-higher).
* BNPO: Xiao et al. 2025, arXiv 2506.02864 (normalised over the batch's tokens).
* CISPO: MiniMax-M1, arXiv 2506.13585; the cap ``epsilon_max`` as in ScaleRL, arXiv 2510.13786.
* SAPO: Gao et al. 2025, "Soft Adaptive Policy Optimization", arXiv 2511.20347.

Each prompt gets a group of ``G`` sampled completions. A completion's advantage is its reward
minus its group's mean, optionally divided by a standard deviation; every token of the
completion shares it. No critic is needed.
"""

from __future__ import annotations

from typing import Literal

import torch

from lft.losses.ppo import clipped_policy_loss, kl_estimate, masked_mean

Scaling = Literal["group", "batch", "none"]
Variant = Literal["grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo"]


def tied_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Per group of ``group_size`` consecutive rewards, whether all are equal (the group carries no
    signal for a group-relative method). Rewards [0, 1 | 2, 2]: [False, True]."""
    grouped = rewards.view(-1, group_size)
    return grouped.max(1).values == grouped.min(1).values


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale: Scaling = "group", eps: float = 1e-4
) -> torch.Tensor:
    """Advantages of ``rewards`` (shape (N,), consecutive groups of ``group_size``).

    ``r - mean(group)``, then divided by ``std + eps`` where std is the unbiased standard
    deviation of the group (``"group"``, GRPO), of the whole batch (``"batch"``), or not at all
    (``"none"``, Dr. GRPO).

    One group [1, 0, 0, 1]: mean 0.5, std sqrt((4 * 0.25) / 3) = 0.57735, so with "group"
    the advantages are +-0.5 / (0.57735 + 1e-4) = +-0.86588; with "none" they are +-0.5.
    A group whose rewards are all equal gets advantage 0 (it carries no signal).
    """
    if rewards.ndim != 1 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.float().view(-1, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale == "group":
        std = grouped.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(grouped[:, :1])
        centred = centred / (std + eps)
    elif scale == "batch":
        std = rewards.float().std() if rewards.numel() > 1 else rewards.new_zeros(())
        centred = centred / (std + eps)
    elif scale != "none":
        raise ValueError(f"unknown advantage scaling {scale!r}; expected group, batch or none")
    return centred.view(-1)


def grpo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    variant: Variant = "grpo",
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    beta: float = 0.0,
    ref_logps: torch.Tensor | None = None,
    max_completion_length: int | None = None,
    weights: torch.Tensor | None = None,
    cispo_max: float = 5.0,
    sapo_temperatures: tuple[float, float] = (1.0, 1.05),
) -> tuple[torch.Tensor, dict]:
    """The policy-gradient surrogate with per-sequence advantages, an optional ``beta * k3`` KL
    term per token, reduced as the variant says:

    * ``grpo``: the clipped surrogate; mean over each sequence's tokens, then mean over sequences;
    * ``dapo``: the clipped surrogate; sum over every token of the batch / the number of tokens;
    * ``bnpo``: the same token mean over the batch. lft's batch is the whole optimizer step (its
      accumulated micro-batches weigh as one batch), so it is the same loss as ``dapo``;
    * ``dr_grpo``: the clipped surrogate; sum over every token / (sequences * ``max_completion_length``);
    * ``cispo``: REINFORCE with the importance ratio capped and without gradient,
      ``-sg(min(r, cispo_max)) * A * logp``, so no token's gradient is cut off as clipping does;
      token mean over the batch;
    * ``sapo``: a soft gate instead of the clip, ``-(4 / tau) * sigmoid(tau * (r - 1)) * A``,
      with ``tau`` the first of ``sapo_temperatures`` where A > 0 and the second elsewhere; its
      gradient at r = 1 is the plain policy gradient and fades smoothly as r moves away; reduced
      as ``grpo``.

    Two sequences, A with 2 tokens and advantage +1, B with 1 token and advantage -1, ratios 1:
    token losses -1, -1 (A) and +1 (B). grpo: mean(-1, +1) = 0; dapo: (-1 - 1 + 1) / 3 = -1/3;
    dr_grpo with max length 2: -1 / (2 * 2) = -0.25.

    :param logps: log-probs of the completion tokens under the policy being trained, (B, T).
    :param old_logps: the same under the policy that sampled them (no gradient), (B, T).
    :param advantages: one per sequence, (B,).
    :param mask: real completion tokens, (B, T).
    :param weights: per-token weights of the loss (KL term included), (B, T), such as the
        importance-sampling correction of ``lft.losses.sampling``; the reductions are unchanged.
    :return: ``(loss, metrics)`` with the clip fraction and, when ``beta`` > 0, the mean k3 KL.
    """
    adv = advantages[:, None]
    if variant == "cispo":
        ratio = torch.exp(logps - old_logps).detach()
        clipped = (ratio > cispo_max) & mask
        losses = -ratio.clamp(max=cispo_max) * adv * logps * mask.to(logps.dtype)
    elif variant == "sapo":
        ratio = torch.exp(logps - old_logps)
        tau = torch.where(adv > 0, sapo_temperatures[0], sapo_temperatures[1]).to(ratio.dtype)
        losses = -(4 / tau) * torch.sigmoid(tau * (ratio - 1)) * adv * mask.to(ratio.dtype)
        clipped = torch.zeros_like(mask, dtype=torch.bool)  # a soft gate clips nothing
    else:
        losses, clipped, _ = clipped_policy_loss(logps, old_logps, adv, mask, clip_eps, clip_eps_high)
    metrics: dict = {}
    if beta > 0:
        if ref_logps is None:
            raise ValueError("beta > 0 needs the reference log-probs")
        kl = kl_estimate(logps, ref_logps, "k3")
        losses = losses + beta * kl * mask.to(losses.dtype)
        metrics["kl_token"] = masked_mean(kl, mask).detach()
    if weights is not None:
        losses = losses * weights.to(losses.dtype)
    mask_f = mask.to(losses.dtype)
    if variant in ("grpo", "sapo"):
        per_sequence = losses.sum(-1) / mask_f.sum(-1).clamp(min=1)
        loss = per_sequence.mean()
    elif variant in ("dapo", "bnpo", "cispo"):
        loss = losses.sum() / mask_f.sum().clamp(min=1)
    elif variant == "dr_grpo":
        length = max_completion_length or mask.shape[-1]
        loss = losses.sum() / (mask.shape[0] * length)
    else:
        raise ValueError(f"unknown GRPO loss variant {variant!r}; expected grpo, dr_grpo, dapo, bnpo, cispo or sapo")
    metrics["clip_fraction"] = masked_mean(clipped.float(), mask).detach()
    return loss, metrics

"""GRPO: group-relative policy optimisation, with the token normalisations of its variants.

* GRPO: Shao et al. 2024, DeepSeekMath, arXiv 2402.03300 (and DeepSeek-R1, arXiv 2501.12948).
* Dr. GRPO: Liu et al. 2025, "Understanding R1-Zero-Like Training", arXiv 2503.20783.
* DAPO: Yu et al. 2025, arXiv 2503.14476 (token-level loss, clip-higher).

Each prompt gets a group of ``G`` sampled completions. A completion's advantage is its reward
minus its group's mean, optionally divided by a standard deviation; every token of the
completion shares it. No critic is needed.
"""

from __future__ import annotations

from typing import Literal

import torch

from lft.losses.ppo import clipped_policy_loss, kl_estimate, masked_mean

Scaling = Literal["group", "batch", "none"]
Variant = Literal["grpo", "dr_grpo", "dapo"]


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
) -> tuple[torch.Tensor, dict]:
    """The clipped surrogate with per-sequence advantages, an optional ``beta * k3`` KL term per
    token, reduced as the variant says:

    * ``grpo``: mean over each sequence's tokens, then mean over sequences;
    * ``dapo``: sum over every token of the batch / the number of tokens;
    * ``dr_grpo``: sum over every token / (sequences * ``max_completion_length``), a constant.

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
    losses, clipped, _ = clipped_policy_loss(logps, old_logps, advantages[:, None], mask, clip_eps, clip_eps_high)
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
    if variant == "grpo":
        per_sequence = losses.sum(-1) / mask_f.sum(-1).clamp(min=1)
        loss = per_sequence.mean()
    elif variant == "dapo":
        loss = losses.sum() / mask_f.sum().clamp(min=1)
    elif variant == "dr_grpo":
        length = max_completion_length or mask.shape[-1]
        loss = losses.sum() / (mask.shape[0] * length)
    else:
        raise ValueError(f"unknown GRPO loss variant {variant!r}; expected grpo, dr_grpo or dapo")
    metrics["clip_fraction"] = masked_mean(clipped.float(), mask).detach()
    return loss, metrics

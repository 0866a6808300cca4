"""RLOO: REINFORCE with a leave-one-out baseline (Kool et al. 2019, "Buy 4 REINFORCE Samples, Get
a Baseline for Free!"; Ahmadian et al. 2024, "Back to Basics", arXiv 2402.14740).

Each prompt gets ``k`` sampled completions. A completion's baseline is the mean reward of the
*other* ``k - 1`` samples of its prompt, so its advantage is an unbiased estimate with no critic:

    A_i = r_i - (sum_j r_j - r_i) / (k - 1) = k / (k - 1) * (r_i - mean(r))

The KL penalty to the reference is part of the reward, per sequence (``r - beta * KL``), as in
the paper, rather than a separate loss term. The policy loss is the PPO-clipped surrogate (with
one update per rollout batch the ratio is 1 and it is plain REINFORCE).
"""

from __future__ import annotations

from typing import Literal

import torch

from lft.losses.ppo import clipped_policy_loss, masked_mean

Reduce = Literal["token", "sequence"]


def leave_one_out_advantages(rewards: torch.Tensor, group_size: int, scale: bool = False) -> torch.Tensor:
    """``r_i`` minus the mean of the other samples of its prompt; ``rewards`` (N,) in consecutive
    groups of ``group_size`` >= 2. With ``scale``, divided by the batch's std of the advantages.

    One group [1, 0, 0, 0]: the first sample's baseline is 0, advantage 1; each other sample's
    baseline is 1/3, advantage -1/3. The advantages of a group sum to 0."""
    if group_size < 2:
        raise ValueError("the leave-one-out baseline needs at least 2 samples per prompt")
    if rewards.ndim != 1 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.float().view(-1, group_size)
    others = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)
    advantages = (grouped - others).view(-1)
    if scale and advantages.numel() > 1:
        advantages = advantages / (advantages.std() + 1e-8)
    return advantages


def rloo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    reduce: Reduce = "token",
    clip_eps: float = 0.2,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict]:
    """The clipped surrogate with one advantage per sequence, reduced as ``reduce`` says:

    * ``token``: the mean over every completion token of the batch;
    * ``sequence``: each sequence's sum over its tokens (REINFORCE on the sequence's log-prob,
      the paper's form), then the mean over sequences.

    Sequences A (2 tokens, advantage +1) and B (1 token, advantage -1), ratios 1: token losses
    -1, -1, +1. token: -1/3; sequence: (-2 + 1) / 2 = -0.5.
    """
    losses, clipped, _ = clipped_policy_loss(logps, old_logps, advantages[:, None], mask, clip_eps)
    if weights is not None:
        losses = losses * weights.to(losses.dtype)
    if reduce == "token":
        loss = losses.sum() / mask.sum().clamp(min=1)
    elif reduce == "sequence":
        loss = losses.sum() / mask.shape[0]
    else:
        raise ValueError(f"unknown reduction {reduce!r}; expected token or sequence")
    return loss, {"clip_fraction": masked_mean(clipped.float(), mask).detach()}

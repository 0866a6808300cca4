"""Importance-sampling correction for completions sampled by another engine than the policy.

An inference engine (vLLM) samples from its own numerics: other kernels, another dtype, its own
sampler. Its distribution ``q`` then differs a little from the distribution ``p`` of the policy
that the update takes as the sampling policy, so the update is slightly off-policy. Truncated
importance sampling (Yao et al. 2025, "Your efficient RL framework secretly brings you off-policy
RL training"; Ionides 2008 for the truncation) weights each token's loss by ``p / q``, capped, as a
constant (no gradient flows through it).

The ratio is taken per token or per sequence (the product over its tokens, i.e. the exponential
of the summed log-ratios), and either truncated at ``clip_max`` (and at ``clip_min`` from below,
when given) or used to mask the tokens or sequences whose ratio falls outside
``[clip_min, clip_max]`` (they then get weight 0; the others weight 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from lft.losses.ppo import masked_mean

Mode = Literal["off", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask"]


@dataclass(frozen=True)
class SamplingCorrection:
    """How the update corrects for the sampler's distribution (``mode`` ``off``: not at all)."""

    mode: Mode = "token_truncate"
    clip_max: float = 3.0
    clip_min: float | None = None


def correction_weights(
    logps: torch.Tensor, sampling_logps: torch.Tensor, mask: torch.Tensor, correction: SamplingCorrection | None
) -> tuple[torch.Tensor | None, dict]:
    """Per-token weights (B, T), without gradient, for the loss of completions whose tokens have
    log-probs ``logps`` under the policy the update starts from and ``sampling_logps`` under the
    engine that sampled them; and metrics: the ratios' mean, min and max over the real tokens (or
    sequences), the share of them truncated or masked, and the mean absolute log-prob difference.
    With no correction (None, or mode ``off``) the weights are None and the metrics are those the
    default correction would see: how far the engine is from the policy is reported either way.

    Two tokens, log-ratios ln 2 and ln 4, cap 3: ``token_truncate`` gives [2, 3] (one truncated);
    ``token_mask`` gives [1, 0]; the sequence's ratio is 2 x 4 = 8, so ``sequence_truncate`` gives
    [3, 3] and ``sequence_mask`` [0, 0]. Masked-out positions get weight 0.
    """
    off = correction is None or correction.mode == "off"
    if correction is None or off:
        correction = SamplingCorrection()
    mask_b = mask.bool()
    diff = (logps.detach().float() - sampling_logps.float()).masked_fill(~mask_b, 0.0)
    low = correction.clip_min if correction.clip_min is not None else 0.0
    high = correction.clip_max
    per_sequence = correction.mode.startswith("sequence")
    ratio = diff.sum(-1, keepdim=True).exp() if per_sequence else diff.exp()
    if correction.mode.endswith("truncate"):
        weights = ratio.clamp(min=low, max=high)
        outside = (ratio > high) | (ratio < low)
    elif correction.mode.endswith("mask"):
        outside = (ratio > high) | (ratio < low)
        weights = (~outside).float()
    else:
        raise ValueError(f"unknown importance-sampling mode {correction.mode!r}")
    weights = weights.expand_as(diff) * mask_b
    units = mask_b.any(-1, keepdim=True) if per_sequence else mask_b  # the real tokens or sequences
    ratios, cut = ratio[units], outside[units].float()
    one = ratio.new_ones(())
    metrics = {
        "is_ratio_mean": ratios.mean() if ratios.numel() else one,
        "is_ratio_min": ratios.min() if ratios.numel() else one,
        "is_ratio_max": ratios.max() if ratios.numel() else one,
        "is_clipped": cut.mean() if cut.numel() else one * 0,
        "sampler_logp_diff": masked_mean(diff.abs(), mask_b),
    }
    return (None if off else weights), metrics

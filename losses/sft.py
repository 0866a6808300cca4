"""Supervised fine-tuning: the negative log-likelihood of the trained tokens."""

from __future__ import annotations

import torch


def masked_nll(logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood over the tokens where ``mask`` is true.

    The mean is over tokens, not sequences, so every trained token weighs the same whatever the
    length of its example. Returns 0 (still attached to the graph) when no token is trained.

    :param logps: per-token log-probs, shape (B, T).
    :param mask: bool mask of trained tokens, shape (B, T).
    """
    count = mask.sum()
    total = -(logps * mask).sum()
    return total / count.clamp(min=1)

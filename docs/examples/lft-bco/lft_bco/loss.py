"""The BCO loss (Jung et al., 2024, "Binary Classifier Optimization for Large Language Model
Alignment", arXiv 2404.04656). Pure tensor math.

BCO trains a binary classifier whose logit is the implied reward: for a completion y of prompt
x, the reward is beta * r with r = log pi(y|x) - log pi_ref(y|x) (summed over the completion's
tokens). A desirable completion should be classified 1 and an undesirable one 0, after the logit
is shifted by delta, the mean reward:

    desirable:    loss = -log sigmoid(beta * r - delta)
    undesirable:  loss = -log sigmoid(-(beta * r - delta))

and the loss is the mean over the batch. delta carries no gradient. It is the mean of every
reward of the training batches before this one (``running_mean``), so a shift that lifts every
completion alike earns nothing. The paper's optional density-ratio matching of the prompts
(UDM) is not implemented here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bco_loss(
    policy_logps: torch.Tensor,
    reference_logps: torch.Tensor,
    desirable: torch.Tensor,
    delta: float = 0.0,
    beta: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(loss, rewards)``; ``rewards`` is beta * r, detached, shape (B,).

    :param policy_logps: summed completion log-probs under the policy, shape (B,).
    :param reference_logps: the same under the reference, shape (B,).
    :param desirable: bool, shape (B,): True for a good completion.
    :param delta: the running mean of earlier rewards, a constant.
    """
    rewards = beta * (policy_logps - reference_logps)
    logits = rewards - float(delta)
    loss = -F.logsigmoid(torch.where(desirable, logits, -logits)).mean()
    return loss, rewards.detach()


def running_mean(mean: float, seen: int, total: float, count: int) -> tuple[float, int]:
    """The mean of ``seen`` values, ``mean``, updated with ``count`` more that add up to ``total``:
    ``(new mean, seen + count)``."""
    seen += count
    if count:
        mean += (total - count * mean) / seen
    return mean, seen

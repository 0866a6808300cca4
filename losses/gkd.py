"""GKD: on-policy distillation (Agarwal et al. 2024, "On-Policy Distillation of Language Models:
Learning from Self-Generated Mistakes", arXiv 2306.13649).

The student samples completions; at every completion token the student's next-token distribution
``Q`` is pulled towards the teacher's ``P`` over the whole vocabulary, by the generalised
Jensen-Shannon divergence of the paper (eq. 4), with ``M = beta P + (1 - beta) Q``:

    JSD(beta) = beta KL(P || M) + (1 - beta) KL(Q || M)

``beta = 0`` is taken as the forward KL(P || Q) (the supervised distillation objective) and
``beta = 1`` as the reverse KL(Q || P) (mode-seeking), the limits of JSD(beta) once divided by
beta and by 1 - beta. Both distributions are taken at the same temperature.
"""

from __future__ import annotations

import math

import torch


def token_divergence(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float = 0.5, temperature: float = 1.0
) -> torch.Tensor:
    """The divergence at each position, shape ``logits.shape[:-1]``.

    Two tokens, P = (1, 0) (teacher certain), Q = (1/2, 1/2): forward KL(P || Q) = log 2 = 0.693147;
    reverse KL(Q || P) is infinite; beta = 0.5: M = (3/4, 1/4), KL(P || M) = log(4/3) = 0.287682,
    KL(Q || M) = 1/2 log(2/3) + 1/2 log 2 = 0.143841, JSD = 0.5 * 0.287682 + 0.5 * 0.143841 = 0.215762.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    s = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    t = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)

    def kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:  # KL(exp p || exp q) from log-probs
        return torch.where(p.isinf(), torch.zeros_like(p), p.exp() * (p - q)).sum(-1)

    if beta == 0.0:
        return kl(t, s)
    if beta == 1.0:
        return kl(s, t)
    m = torch.logsumexp(torch.stack([t + math.log(beta), s + math.log(1 - beta)]), dim=0)
    return beta * kl(t, m) + (1 - beta) * kl(s, m)


def gkd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    beta: float = 0.5,
    temperature: float = 1.0,
) -> torch.Tensor:
    """The mean divergence over the real completion tokens (``mask``, (B, C)); logits (B, C, V)."""
    per_token = token_divergence(student_logits, teacher_logits.detach(), beta, temperature)
    mask = mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp(min=1)

"""PPO for language models: the clipped surrogate, the clipped value loss, GAE, the per-token KL
penalty and its adaptive coefficient.

* PPO: Schulman et al. 2017, arXiv 1707.06347.
* GAE: Schulman et al. 2015, arXiv 1506.02438.
* The KL penalty per token toward the SFT policy, folded into the reward, and the adaptive
  coefficient: Ziegler et al. 2019 (arXiv 1909.08593); InstructGPT (arXiv 2203.02155).
* The k1 and k3 KL estimators: J. Schulman, "Approximating KL divergence" (2020).

Shapes: ``(B, T)`` per completion token, with a ``mask`` of real tokens (right padding is False).
Every mean here is over the masked tokens of the whole batch.
"""

from __future__ import annotations

from typing import Literal

import torch

KLEstimator = Literal["k1", "k3"]


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over the positions where ``mask`` is true (0 when none is)."""
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased variance of ``x`` over the masked positions (0 with fewer than two)."""
    mask = mask.to(x.dtype)
    count = mask.sum()
    centred = (x - masked_mean(x, mask)) * mask
    return centred.square().sum() / (count - 1).clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``(x - mean) / std`` over the masked positions; masked-out positions become 0.

    x = [1, 2, 3] (a fourth value masked out): mean 2, unbiased variance (1 + 0 + 1) / 2 = 1,
    so the result is [-1, 0, 1, 0].
    """
    out = (x - masked_mean(x, mask)) * torch.rsqrt(masked_var(x, mask) + eps)
    return out * mask.to(x.dtype)


def kl_estimate(logps: torch.Tensor, ref_logps: torch.Tensor, estimator: KLEstimator = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from the sampled tokens' log-probs.

    * k1 = logp - ref_logp: unbiased, can be negative per token.
    * k3 = exp(d) - 1 - d with d = ref_logp - logp: unbiased and never negative.

    logp = -1, ref_logp = -2: k1 = 1; d = -1, k3 = e^-1 - 1 + 1 = 0.36788.
    """
    if estimator == "k1":
        return logps - ref_logps
    if estimator == "k3":
        d = ref_logps - logps
        return torch.expm1(d) - d
    raise ValueError(f"unknown KL estimator {estimator!r}; expected k1 or k3")


def kl_penalized_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-token rewards as in InstructGPT: ``-beta * kl`` on every token, plus the sequence's
    score on its last real token.

    scores = [1.0], kl = [[0.5, 0.2, 0.1]] all real, beta = 0.1:
    [-0.05, -0.02, -0.01 + 1.0] = [-0.05, -0.02, 0.99].
    """
    mask_f = mask.to(kl.dtype)
    rewards = -beta * kl * mask_f
    last = (mask.long().cumsum(-1) * mask.long()).argmax(-1)  # index of each row's last real token
    has_tokens = mask.any(-1)
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last] += scores.to(rewards.dtype) * has_tokens.to(rewards.dtype)
    return rewards


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over each row's real tokens, then the returns.

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` (``V`` after the last real token is 0: the episode
    ends there), ``A_t = delta_t + gamma * lam * A_{t+1}``, ``returns = A + V``.

    rewards [0, 0, 1], values [0.5, 0.6, 0.7], gamma 1, lam 0.5:
    deltas (0 + 0.6 - 0.5, 0 + 0.7 - 0.6, 1 + 0 - 0.7) = (0.1, 0.1, 0.3);
    A = (0.1 + 0.5 * 0.25, 0.1 + 0.5 * 0.3, 0.3) = (0.225, 0.25, 0.3); returns (0.725, 0.85, 1.0).

    :return: ``(advantages, returns)``, both 0 where ``mask`` is False.
    """
    mask_f = mask.to(values.dtype)
    length = rewards.shape[-1]
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])
    for t in reversed(range(length)):
        following = mask_f[:, t + 1] if t + 1 < length else torch.zeros_like(running)
        next_value = values[:, t + 1] * following if t + 1 < length else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running * following
        advantages[:, t] = running * mask_f[:, t]
    returns = (advantages + values) * mask_f
    return advantages, returns


def clipped_policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token PPO surrogate ``max(-A r, -A clip(r, 1 - eps, 1 + eps_high))``, ``r = exp(logp - old)``.

    Returns the per-token losses (not reduced, so GRPO can normalise them its own ways), a bool
    tensor of tokens where clipping was active, and the ratios.

    old = -1, A = 1: logp = -1 gives r = 1 and loss -1; logp = -0.5 gives r = 1.6487, clipped to
    1.2 with eps 0.2, loss max(-1.6487, -1.2) = -1.2 (clipped). A = -1 with r = 0.5:
    max(0.5, 0.8) = 0.8 (clipped).
    """
    high = clip_eps if clip_eps_high is None else clip_eps_high
    ratio = torch.exp(logps - old_logps)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_eps, 1.0 + high)
    losses = torch.maximum(unclipped, clipped)
    return losses * mask.to(losses.dtype), (clipped > unclipped) & mask, ratio


def ppo_policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict]:
    """The clipped surrogate averaged over the batch's tokens, with its clip fraction and the
    approximate KL from the rollout policy (k3 of the ratio). ``weights`` (B, T) weight each
    token's loss (the importance-sampling correction of ``lft.losses.sampling``).

    The two tokens of the ``clipped_policy_loss`` example with A = 1: (-1 + -1.2) / 2 = -1.1;
    clip fraction 1/2.
    """
    losses, clipped, ratio = clipped_policy_loss(logps, old_logps, advantages, mask, clip_eps)
    if weights is not None:
        losses = losses * weights.to(losses.dtype)
    with torch.no_grad():
        approx_kl = masked_mean(kl_estimate(logps, old_logps, "k3"), mask)
        clip_fraction = masked_mean(clipped.float(), mask)
    return masked_mean(losses, mask), {"clip_fraction": clip_fraction, "approx_kl": approx_kl}


def clipped_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip: float = 0.2
) -> tuple[torch.Tensor, torch.Tensor]:
    """``0.5 * max((V - R)^2, (V_clip - R)^2)`` averaged over tokens, where ``V_clip`` keeps the
    new value within ``clip`` of the rollout's value; and the fraction of tokens clipped.

    V = 2, V_old = 1, R = 3, clip 0.5: V_clip = 1.5; max(1, 2.25) = 2.25; loss 1.125, clipped 1.
    """
    clipped_values = old_values + (values - old_values).clamp(-clip, clip)
    plain = (values - returns).square()
    limited = (clipped_values - returns).square()
    loss = 0.5 * masked_mean(torch.maximum(plain, limited), mask)
    return loss, masked_mean((limited > plain).float(), mask).detach()


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``1 - Var(R - V) / Var(R)`` over the masked tokens: 1 is a perfect critic, 0 one that
    predicts the mean, negative one worse than that.

    R = [1, 2, 3], V = [1, 2, 2]: Var(R - V) = Var([0, 0, 1]) = 1/3, Var(R) = 1, so 2/3.
    Returns that do not vary leave it undefined; it is reported as 0 then.
    """
    var_returns = masked_var(returns, mask)
    if float(var_returns) < 1e-12:
        return torch.zeros((), dtype=returns.dtype, device=returns.device)
    return 1.0 - masked_var(returns - values, mask) / var_returns


class AdaptiveKLController:
    """The KL coefficient of Ziegler et al. 2019: after each rollout of ``n`` samples with mean
    sequence KL ``kl``, ``beta *= 1 + clip((kl - target) / target, -0.2, 0.2) * n / horizon``.

    beta 0.1, target 6, horizon 10000, kl 12, n 100: the error (12 - 6) / 6 = 1 is clipped to
    0.2, so beta becomes 0.1 * (1 + 0.2 * 100 / 10000) = 0.1002.
    With ``target`` None the coefficient stays fixed.
    """

    def __init__(self, beta: float, target: float | None = None, horizon: int = 10000):
        self.beta = float(beta)
        self.target = target
        self.horizon = horizon

    def update(self, kl: float, n: int) -> float:
        if self.target:
            error = max(-0.2, min(0.2, (kl - self.target) / self.target))
            self.beta *= 1.0 + error * n / self.horizon
        return self.beta

    def state_dict(self) -> dict:
        return {"beta": self.beta}

    def load_state_dict(self, state: dict) -> None:
        self.beta = float(state.get("beta", self.beta))

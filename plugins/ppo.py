"""PPO with a per-token KL penalty toward the starting (SFT) policy: stage 3 of the InstructGPT
pipeline (arXiv 2203.02155), with the clipped surrogate of arXiv 1707.06347 and GAE.

Each rollout batch is scored by the selected reward plugins (for RLHF, ``reward_model`` with the
model from ``lft run --plugin reward``). Every token's reward is ``-beta * KL`` to the reference,
and the sequence's score is added on its last token. A critic estimates per-token values; GAE
turns rewards and values into advantages, which are whitened; then ``epochs`` x ``minibatches``
optimizer steps follow on the batch.

The critic is either a value head on the policy's own body (``ppo.critic=policy``, cheapest: one
forward pass gives log-probs and values) or a separate model initialised from the reward model
(``ppo.critic=reward_model``), as in InstructGPT.
"""

from __future__ import annotations

from typing import Any, Literal, Mapping

import torch
from pydantic import Field

from lft.adapters.critic import ValueHead, reward_model_critic
from lft.losses.ppo import (
    AdaptiveKLController,
    clipped_value_loss,
    explained_variance,
    gae,
    kl_estimate,
    kl_penalized_rewards,
    masked_mean,
    ppo_policy_loss,
    whiten,
)
from lft.plugins.online import OnlineMethod
from lft.plugins.online_update import OnlineOptions, RolloutObjective


class PPOOptions(OnlineOptions):
    epochs: int = Field(2, gt=0, description="Passes over each rollout batch.")
    minibatches: int = Field(
        2, gt=0, description="Optimizer steps per pass; the rollout batch is split this many ways."
    )
    num_generations: int = Field(1, ge=1, description="Completions sampled per prompt.")
    beta: float = Field(0.05, ge=0, description="KL penalty coefficient per token (the starting value when adaptive).")
    kl_target: float | None = Field(
        None, gt=0, description="Target KL per completion; set it to adapt beta (Ziegler et al.)."
    )
    kl_horizon: int = Field(10000, gt=0, description="Samples over which the adaptive beta moves by at most 20%.")
    gamma: float = Field(1.0, ge=0, le=1, description="Discount of GAE.")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda: 1 is Monte-Carlo returns, 0 one-step TD.")
    clip_eps: float = Field(0.2, gt=0, lt=1, description="PPO clip range of the probability ratio.")
    value_clip: float = Field(0.2, gt=0, description="How far a new value may move from the rollout's value.")
    vf_coef: float = Field(0.1, ge=0, description="Weight of the value loss.")
    whiten_advantages: bool = Field(True, description="Normalise advantages to mean 0, std 1 per rollout batch.")
    critic: Literal["policy", "reward_model"] = Field(
        "policy",
        description="A value head on the policy's body, or a separate critic initialised from "
        "the reward model in reward_model.path.",
    )


class PPOObjective(RolloutObjective):
    """The PPO update, with the critic as ``module.value_head`` or ``module.critic``."""

    opts: PPOOptions

    def __init__(self, opts: PPOOptions, config: Any):
        shared = opts.critic == "policy"
        super().__init__(
            "ppo",
            opts,
            config,
            num_generations=opts.num_generations,
            needs_reference=opts.beta > 0,
            value_states=shared,
        )
        self.kl_control = AdaptiveKLController(opts.beta, opts.kl_target, opts.kl_horizon)
        self.rollout.policy_logps = True  # the KL penalty is part of the reward, computed before any update

    def setup(self, module: Any) -> None:
        super().setup(module)
        if self.opts.critic == "policy":
            if getattr(module, "value_head", None) is None:
                module.value_head = ValueHead.for_model(module.model)
        elif getattr(module, "critic", None) is None:
            module.critic = reward_model_critic(self.config, module.model)

    def values(self, module: Any, exp: dict, rows: Any, hidden: torch.Tensor | None) -> torch.Tensor:
        if hidden is not None:
            return module.value_head(hidden)
        start = exp["prompt_length"] - 1
        values = module.critic(exp["input_ids"][rows], exp["attention_mask"][rows], exp["position_ids"][rows])
        return values[:, start:-1]

    def prepare(self, module: Any, exp: dict) -> dict:
        opts, mask = self.opts, exp["completion_mask"]
        with torch.no_grad():
            rows = torch.arange(mask.shape[0], device=mask.device)
            old_values = self.values(module, exp, rows, exp.pop("hidden", None)).float() * mask
            kl = (
                kl_estimate(exp["logps"], exp["ref_logps"], opts.kl_estimator) * mask
                if "ref_logps" in exp
                else torch.zeros_like(old_values)
            )
            beta = self.kl_control.beta
            rewards = kl_penalized_rewards(exp["rewards"], kl, mask, beta)
            advantages, returns = gae(rewards, old_values, mask, opts.gamma, opts.lam)
            if opts.whiten_advantages:
                advantages = whiten(advantages, mask)
            sequence_kl = float(kl.sum(-1).mean())
            self.kl_control.update(sequence_kl, mask.shape[0])
        return {
            "old_values": old_values,
            "advantages": advantages,
            "returns": returns,
            "ppo_stats": {
                "kl_coef": beta,
                "value_mean": float(masked_mean(old_values, mask)),
                "explained_variance": float(explained_variance(old_values, returns, mask)),
            },
        }

    def loss(self, module: Any, exp: dict, rows: Any) -> tuple[torch.Tensor, dict]:
        opts, mask = self.opts, exp["completion_mask"][rows]
        shared = opts.critic == "policy"
        stats = self.policy_stats(module, exp, rows, hidden=shared)
        values = self.values(module, exp, rows, stats.get("hidden")).float()
        policy_loss, metrics = ppo_policy_loss(
            stats["logps"], stats["old_logps"], exp["advantages"][rows], mask, opts.clip_eps, stats.get("weights")
        )
        metrics.update(stats.get("sampling_metrics", {}))
        value_loss, value_clipped = clipped_value_loss(
            values, exp["old_values"][rows], exp["returns"][rows], mask, opts.value_clip
        )
        metrics.update(
            policy_loss=policy_loss.detach(), value_loss=value_loss.detach(), value_clip_fraction=value_clipped
        )
        return policy_loss + opts.vf_coef * value_loss, metrics

    def step_metrics(self, exp: dict, update_s: float, step: int) -> dict:
        return {**super().step_metrics(exp, update_s, step), **exp.get("ppo_stats", {})}

    def state_dict(self) -> dict:
        return {"kl_control": self.kl_control.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.kl_control.load_state_dict(state.get("kl_control", {}))


class PPO(OnlineMethod):
    """Objective: PPO against the selected rewards with a KL penalty toward the starting policy."""

    name = "ppo"
    options = PPOOptions
    objective_class = PPOObjective
    default_settings = {
        "trainer.max_steps": 48,
        "trainer.batch_size": 8,
        "trainer.lr": 2e-4,
        "trainer.warmup_steps": 0,
        "trainer.schedule": "constant",
        "data.max_eval_rows": 32,
        "{name}.max_new_tokens": 32,
    }

"""RLOO: REINFORCE with a leave-one-out baseline (Ahmadian et al. 2024, arXiv 2402.14740). Each
prompt gets ``rloo.num_generations`` samples; each sample's baseline is the mean reward of the
others, so no critic is trained. The KL penalty to the reference (``rloo.beta``) is taken off each
sequence's reward. The maths is in ``lft.losses.rloo``.

Rewards come from the selected reward plugins: ``lft run --plugin rloo --plugin exact_answer``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from lft.losses.grpo import tied_groups
from lft.losses.ppo import kl_estimate
from lft.losses.rloo import leave_one_out_advantages, rloo_loss
from lft.plugins.online import EMBEDDED_ROLLOUT, OnlineMethod
from lft.plugins.online_update import OnlineOptions, RolloutObjective


class RLOOOptions(OnlineOptions):
    num_generations: int = Field(4, ge=2, description="Samples per prompt, k; each one's baseline is the other k - 1.")
    beta: float = Field(
        0.05, ge=0, description="KL penalty in the reward: r - beta * sum of log(pi / ref) over the completion."
    )
    clip_eps: float = Field(0.2, gt=0, lt=1, description="PPO clip range of the ratio (epochs or minibatches > 1).")
    reduce: Literal["token", "sequence"] = Field(
        "token",
        description="token: the mean over the batch's completion tokens; sequence: each completion's summed "
        "log-prob, the paper's REINFORCE, averaged over completions.",
    )
    scale_advantages: bool = Field(False, description="Divide the advantages by their std over the batch.")


class RLOOObjective(RolloutObjective):
    """The RLOO update on a batch of grouped experience."""

    opts: RLOOOptions

    def __init__(self, opts: RLOOOptions, config: Any):
        super().__init__("rloo", opts, config, num_generations=opts.num_generations, needs_reference=opts.beta > 0)
        if opts.beta > 0:
            self.rollout.policy_logps = True  # the KL penalty is part of the reward, before any update

    def prepare(self, module: Any, exp: dict) -> dict:
        rewards = exp["rewards"].float()
        out: dict = {}
        if self.opts.beta > 0:
            kl = (kl_estimate(exp["logps"], exp["ref_logps"], "k1") * exp["completion_mask"]).sum(-1).float()
            rewards = rewards - self.opts.beta * kl
            out["sequence_kl"] = kl
        out["advantages"] = leave_one_out_advantages(rewards, self.opts.num_generations, self.opts.scale_advantages)
        return out

    def rows_units(self, exp: dict, rows: Any) -> dict:
        if self.opts.reduce == "token":
            return {"tokens": exp["completion_mask"][rows].sum()}
        return {"sequences": len(rows)}

    def loss(self, module: Any, exp: dict, rows: Any) -> tuple[Any, dict]:
        stats = self.policy_stats(module, exp, rows)
        loss, metrics = rloo_loss(
            stats["logps"],
            stats["old_logps"],
            exp["advantages"][rows],
            exp["completion_mask"][rows],
            self.opts.reduce,
            self.opts.clip_eps,
            weights=stats.get("weights"),
        )
        return loss, {**metrics, **stats.get("sampling_metrics", {})}

    def step_metrics(self, exp: dict, update_s: float, step: int) -> dict:
        metrics = super().step_metrics(exp, update_s, step)
        metrics["groups_without_signal"] = tied_groups(exp["rewards"], self.opts.num_generations).float().mean()
        if "sequence_kl" in exp:
            metrics["reward_kl_penalty"] = self.opts.beta * exp["sequence_kl"].mean()
        return metrics


class RLOO(OnlineMethod):
    """Objective: REINFORCE with the leave-one-out baseline, from the policy's own samples."""

    name = "rloo"
    options = RLOOOptions
    objective_class = RLOOObjective
    # The embedded task's prompts, as GRPO's default job: 8 prompts x 8 samples at T=0.7.
    default_settings = {
        **EMBEDDED_ROLLOUT,
        "{name}.num_generations": 8,
        "{name}.temperature": 0.7,
    }

"""GRPO: sample a group of completions per prompt and push each one by how much better it scored
than its group (DeepSeekMath, arXiv 2402.03300). No critic; the reference policy is used only
when ``grpo.beta`` > 0.

Rewards come from the selected reward plugins (``lft_reward``): for example
``lft run --plugin grpo --plugin exact_answer`` on prompt/answer data.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import AliasChoices, Field

from lft.losses.grpo import group_advantages, grpo_loss, tied_groups
from lft.plugins.online import EMBEDDED_ROLLOUT, OnlineMethod
from lft.plugins.online_update import OnlineOptions, RolloutObjective


class GRPOOptions(OnlineOptions):
    num_generations: int = Field(4, ge=2, description="Completions sampled per prompt (the group).")
    beta: float = Field(0.0, ge=0, description="Weight of the k3 KL penalty to the reference; 0 needs no reference.")
    clip_eps: float = Field(0.2, gt=0, lt=1, description="PPO clip range of the probability ratio.")
    clip_eps_high: float | None = Field(
        None,
        gt=0,
        validation_alias=AliasChoices("clip_eps_high", "epsilon_high"),
        description="Upper clip range, two-sided clipping as in DAPO (clip-higher, e.g. 0.28); also grpo.epsilon_high. "
        "Empty means clip_eps.",
    )
    loss: Literal["grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo"] = Field(
        "grpo",
        description="grpo: per-sequence mean; dr_grpo: constant normaliser; dapo and bnpo: token mean over the batch "
        "(the same in lft, whose batch is the optimizer step); cispo: REINFORCE with the capped ratio as a constant "
        "weight; sapo: a soft sigmoid gate instead of the clip (lft.losses.grpo).",
    )
    cispo_max: float = Field(5.0, gt=0, description="cispo: the cap of the importance ratio (ScaleRL's epsilon_max).")
    sapo_temperature_pos: float = Field(1.0, gt=0, description="sapo: the gate's temperature where the advantage > 0.")
    sapo_temperature_neg: float = Field(1.05, gt=0, description="sapo: the gate's temperature elsewhere.")
    scale_advantages: Literal["group", "batch", "none"] = Field(
        "group", description="Divide advantages by the reward std of the group, of the batch, or not at all."
    )


#: Consecutive steps with one reward for every sample in most groups, after which the run warns.
NO_SIGNAL_STEPS = 5


class GRPOObjective(RolloutObjective):
    """The GRPO update on a batch of grouped experience."""

    opts: GRPOOptions

    def __init__(self, opts: GRPOOptions, config: Any):
        super().__init__("grpo", opts, config, num_generations=opts.num_generations, needs_reference=opts.beta > 0)
        self.quiet_steps = 0  # consecutive steps on which most groups had one reward for every sample

    def prepare(self, module: Any, exp: dict) -> dict:
        advantages = group_advantages(exp["rewards"], self.opts.num_generations, self.opts.scale_advantages)
        return {"advantages": advantages}

    def rows_units(self, exp: dict, rows: Any) -> dict:
        """dapo, bnpo and cispo average over completion tokens; grpo and sapo (a mean of
        per-sequence means) and dr_grpo (each sequence's sum over a constant length) over sequences."""
        if self.opts.loss in ("dapo", "bnpo", "cispo"):
            return {"tokens": exp["completion_mask"][rows].sum()}
        return {"sequences": len(rows)}

    def loss(self, module: Any, exp: dict, rows: Any) -> tuple[Any, dict]:
        opts = self.opts
        stats = self.policy_stats(module, exp, rows)
        loss, metrics = grpo_loss(
            stats["logps"],
            stats["old_logps"],
            exp["advantages"][rows],
            exp["completion_mask"][rows],
            opts.loss,
            opts.clip_eps,
            opts.clip_eps_high,
            opts.beta,
            exp["ref_logps"][rows] if opts.beta > 0 else None,
            opts.max_new_tokens,
            weights=stats.get("weights"),
            cispo_max=opts.cispo_max,
            sapo_temperatures=(opts.sapo_temperature_pos, opts.sapo_temperature_neg),
        )
        return loss, {**metrics, **stats.get("sampling_metrics", {})}

    def step_metrics(self, exp: dict, update_s: float, step: int) -> dict:
        metrics = super().step_metrics(exp, update_s, step)
        quiet = tied_groups(exp["rewards"], self.opts.num_generations).float().mean()
        metrics["groups_without_signal"] = quiet
        self.quiet_steps = self.quiet_steps + 1 if float(quiet) > 0.5 else 0
        if self.quiet_steps == NO_SIGNAL_STEPS:
            self.note_warning(
                f"no learning signal: in most groups every sample of a prompt got the same reward, for "
                f"{NO_SIGNAL_STEPS} steps running ({float(quiet):.0%} of the groups at step {step}); GRPO learns "
                "only from differences within a group. Check that the reward can score these completions "
                "(lft generate on a few prompts), or raise grpo.temperature or grpo.num_generations",
                kind="no-signal",
            )
        return metrics


class GRPO(OnlineMethod):
    """Objective: group-relative policy optimisation from the policy's own samples."""

    name = "grpo"
    options = GRPOOptions
    objective_class = GRPOObjective
    # On the embedded task from the instruct model: 8 prompts x 8 samples at T=0.7 for 50 steps took
    # held-out accuracy from 0.12 to 0.49 (docs/methods/grpo.md); at T=1 too few samples are right.
    default_settings = {
        **EMBEDDED_ROLLOUT,
        "{name}.num_generations": 8,
        "{name}.temperature": 0.7,
    }

"""Online DPO: DPO on pairs the policy samples itself, ranked by the selected reward plugins (Guo
et al. 2024, "Direct Language Model Alignment from Online AI Feedback", arXiv 2402.04792).

Each step samples ``online_dpo.num_generations`` completions per prompt; the best-scored becomes
the chosen answer and the worst-scored the rejected one, and the DPO family's loss
(``lft.losses.dpo``: sigmoid, ipo, hinge, robust) trains on the pair against the reference, the
model as training started. A prompt whose samples all score the same gives no pair that step.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field

from lft.losses.dpo import VARIANTS
from lft.losses.grpo import tied_groups
from lft.losses.preference import PairLogps
from lft.plugins.online import EMBEDDED_ROLLOUT, OnlineMethod
from lft.plugins.online_update import OnlineOptions, RolloutObjective
from lft.plugins.preference import pair_accuracy


class OnlineDPOOptions(OnlineOptions):
    num_generations: int = Field(
        2, ge=2, description="Samples per prompt; the best and the worst by reward make its pair."
    )
    beta: float = Field(0.1, gt=0, description="Strength of the pull towards the reference (tau for ipo).")
    loss: Literal["sigmoid", "ipo", "hinge", "robust"] = Field(
        "sigmoid", description="The DPO-family loss on each pair (as dpo.loss)."
    )
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="Assumed rate of misranked pairs (sigmoid, robust).")
    missing_eos_penalty: float = Field(
        0.0, ge=0, description="Taken off the reward of a completion that did not end before max_new_tokens."
    )


def rank_pairs(rewards: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(chosen, rejected, ranked)``: per prompt, the row of its best-scored sample and of its
    worst (the first of equals), and whether they differ. ``rewards`` (N,) in consecutive groups.

    Rewards [0, 1, 1, 0 | 2, 2, 2, 2] in groups of 4: prompt 0 picks rows 1 (best) and 0 (worst),
    prompt 1 has no pair (every sample scored 2)."""
    grouped = rewards.view(-1, group)
    best, worst = grouped.argmax(1), grouped.argmin(1)
    offset = torch.arange(grouped.shape[0], device=rewards.device) * group
    ranked = ~tied_groups(rewards, group)
    return best + offset, worst + offset, ranked


class OnlineDPOObjective(RolloutObjective):
    """The DPO update on the ranked pairs of each rollout batch."""

    opts: OnlineDPOOptions
    progress_metrics = ("reward", "margin", "kl")

    def __init__(self, opts: OnlineDPOOptions, config: Any):
        super().__init__("online_dpo", opts, config, num_generations=opts.num_generations, needs_reference=True)
        self.rows_together = opts.num_generations
        cls = VARIANTS[opts.loss]
        smoothing = {"label_smoothing": opts.label_smoothing} if opts.loss in ("sigmoid", "robust") else {}
        self.pair_loss = cls(beta=opts.beta, **smoothing)

    def prepare(self, module: Any, exp: dict) -> dict:
        scores = exp["rewards"].float() - self.opts.missing_eos_penalty * (~exp["stopped"]).float()
        chosen, rejected, ranked = rank_pairs(scores, self.opts.num_generations)
        role = torch.zeros_like(scores, dtype=torch.long)  # 1 chosen, -1 rejected, 0 neither
        role[chosen[ranked]], role[rejected[ranked]] = 1, -1
        return {"pair_role": role, "ranked_pairs": ranked.float().mean(), "judge_scores": scores}

    def rows_units(self, exp: dict, rows: Any) -> dict:
        return {"pairs": (exp["pair_role"][rows] == 1).sum()}

    def loss(self, module: Any, exp: dict, rows: Any) -> tuple[Any, dict]:
        role = exp["pair_role"][rows].view(-1, self.opts.num_generations)
        kept = role.eq(1).any(1)
        grouped = rows.view(-1, self.opts.num_generations)[kept]
        if not len(grouped):  # no prompt of these rows gave a pair: a zero loss that still has a graph
            zero = sum(p.sum() * 0 for p in module.model.parameters() if p.requires_grad)
            return zero, {}
        role = role[kept]
        picked = torch.stack([grouped[role == 1], grouped[role == -1]], 1).flatten()  # chosen, rejected, ...
        stats = self.policy_stats(module, exp, picked)
        mask = exp["completion_mask"][picked].to(stats["logps"].dtype)
        sums = (stats["logps"] * mask).sum(-1).view(-1, 2)
        ref = (exp["ref_logps"][picked].to(mask.dtype) * mask).sum(-1).view(-1, 2)
        counts = mask.sum(-1).view(-1, 2)
        pairs = PairLogps(sums[:, 0], sums[:, 1], counts[:, 0], counts[:, 1], ref[:, 0], ref[:, 1])
        out = self.pair_loss(pairs)
        margin = out.chosen_rewards - out.rejected_rewards
        metrics = {
            "margin": margin.mean(),
            "accuracy": pair_accuracy(out.chosen_rewards, out.rejected_rewards),
            "rewards_chosen": out.chosen_rewards.mean(),
            "rewards_rejected": out.rejected_rewards.mean(),
            "logps_chosen": pairs.chosen.detach().mean(),
            "logps_rejected": pairs.rejected.detach().mean(),
        }
        return out.loss, metrics

    def step_metrics(self, exp: dict, update_s: float, step: int) -> dict:
        metrics = super().step_metrics(exp, update_s, step)
        metrics["ranked_pairs"] = exp["ranked_pairs"]
        role = exp["pair_role"]
        if bool((role == 1).any()):
            scores = exp["judge_scores"]
            metrics["score_gap"] = scores[role == 1].mean() - scores[role == -1].mean()
        if float(exp["ranked_pairs"]) == 0:
            self.note_warning(
                f"no pair at step {step}: every sample of each prompt got the same reward, so online DPO had "
                "nothing to learn from; raise online_dpo.num_generations or online_dpo.temperature, or check "
                "that the reward can tell the completions apart",
                kind="no-pairs",
            )
        return metrics


class OnlineDPO(OnlineMethod):
    """Objective: DPO on the policy's own samples, ranked by the reward plugins."""

    name = "online_dpo"
    options = OnlineDPOOptions
    objective_class = OnlineDPOObjective
    # The embedded task's prompts: 8 prompts x 4 samples at T=0.7, best against worst.
    default_settings = {
        **EMBEDDED_ROLLOUT,
        "{name}.num_generations": 4,
        "{name}.temperature": 0.7,
    }

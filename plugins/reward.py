"""Reward model training (RLHF stage 2): a scalar score per (prompt, completion), trained with the
Bradley-Terry pairwise loss (``lft.losses.bradley_terry``) on preference pairs.

The model is the causal LM loaded and wrapped like any other (LoRA, QLoRA or full) with a linear
value head on its backbone's last hidden state at the last token. It is saved as a standard
transformers ``AutoModelForSequenceClassification`` folder (one label, safetensors) with the
tokenizer, which ``lft.adapters.scorer.load`` (and any transformers user) can read.
"""

from __future__ import annotations

from typing import Any, Mapping

from pydantic import Field

import lft
from lft.adapters import value_head
from lft.losses.bradley_terry import BradleyTerryLoss
from lft.objective import Objective, RowTexts
from lft.plugins.pairs import concatenated, measure_pairs, pair_texts
from lft.plugins.preference import Preference, PreferenceOptions, pair_accuracy


class RewardOptions(PreferenceOptions):
    center_coefficient: float = Field(
        0.0,
        ge=0,
        description="Weight of the penalty mean((r_c + r_r)^2) that keeps "
        "rewards centred on zero (0 disables it; 0.01 is common).",
    )
    margin_column: str | None = Field(
        "margin", description="Column giving the reward gap a pair must reach, used when a row has it; empty to ignore."
    )


class RewardObjective(Objective):
    """Bradley-Terry loss on the value head's rewards for the chosen and rejected sequences,
    which go through the backbone together in one forward pass. A mean over pairs."""

    progress_metrics = ("accuracy", "margin", "reward")
    summary_metrics = ("accuracy",)

    def __init__(self, loss: BradleyTerryLoss):
        self.loss = loss

    def units(self, batch: Mapping[str, Any]) -> dict:
        return {"pairs": batch["chosen_input_ids"].shape[0]}

    def setup(self, module: Any) -> None:
        if value_head.is_quantized(module.model):
            raise lft.ModelError(
                "a reward model is saved as a full-precision sequence classifier, which a quantized "
                "base cannot be merged into; train it with --plugin lora or --plugin full"
            )
        value_head.attach(module.model)

    def __call__(self, module: Any, batch: Mapping[str, Any]) -> tuple[Any, dict]:
        pad_id = module.tokenizer.pad_token_id
        ids, mask, _ = concatenated(batch, pad_id)
        rewards = value_head.rewards(module.model, ids, mask, pad_id)
        size = batch["chosen_input_ids"].shape[0]
        chosen, rejected = rewards[:size], rewards[size:]
        loss = self.loss(chosen, rejected, batch.get("margin"))
        chosen, rejected = chosen.detach(), rejected.detach()
        return loss, {
            "rewards_chosen": chosen.mean(),
            "rewards_rejected": rejected.mean(),
            "margin": (chosen - rejected).mean(),
            "accuracy": pair_accuracy(chosen, rejected),
        }

    def measure(self, model: Any, tokenizer: Any, features: Any, settings: Any) -> dict:
        return measure_pairs(model, tokenizer, features, settings)

    def row_texts(self, row: Mapping[str, Any]) -> RowTexts:
        return pair_texts(row)


class Reward(Preference):
    """Objective: a scalar reward model from preference pairs; saved as a sequence classifier."""

    name = "reward"
    options = RewardOptions
    default_settings = {"trainer.max_steps": 60, "trainer.batch_size": 8, "trainer.lr": 1e-3, "eval.task": "none"}

    def format_row(self, example: dict, tokenizer: Any, config: Any) -> dict:
        feature = super().format_row(example, tokenizer, config)
        column = config.section(self.name).margin_column
        if "skip" not in feature and column and example.get(column) is not None:
            try:
                feature["margin"] = float(example[column])
            except (TypeError, ValueError):
                raise lft.DataError(f"'{column}' must be a number, got {example[column]!r}") from None
        return feature

    def loss(self, options: RewardOptions) -> Any:
        return BradleyTerryLoss(options.center_coefficient)

    def objective(self, config: Any) -> Any:
        return RewardObjective(self.loss(config.section(self.name)))

    @lft.hookimpl
    def lft_save_model(self, model: Any, tokenizer: Any, path: str, config: Any) -> Any:
        value_head.export_sequence_classifier(model, tokenizer, path)
        return path

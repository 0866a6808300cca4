"""DPO: Direct Preference Optimization (Rafailov et al. 2023, https://arxiv.org/abs/2305.18290),
with its IPO, hinge and robust (label-smoothed) variants.

Trains on ``prompt``/``chosen``/``rejected`` pairs against a reference policy: the model itself
with the LoRA adapter switched off, or a frozen copy under full fine-tuning. The losses are in
``lft.losses.dpo``; the data path and metrics are shared with the other preference objectives.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

import lft
from lft.losses.dpo import VARIANTS
from lft.losses.preference import WithChosenNLL
from lft.plugins.preference import Preference, PreferenceOptions, precompute_callback


class DPOOptions(PreferenceOptions):
    beta: float = Field(
        0.1,
        gt=0,
        description="Strength of the pull towards the reference (tau for ipo). Lower lets the policy move further.",
    )
    loss: Literal["sigmoid", "ipo", "hinge", "robust"] = Field(
        "sigmoid", description="sigmoid (DPO), ipo (Azar et al.), hinge (SLiC-style), robust (Chowdhury et al.)."
    )
    label_smoothing: float = Field(
        0.0,
        ge=0,
        lt=0.5,
        description="Assumed rate of flipped labels: conservative "
        "DPO with loss=sigmoid, the unbiased estimator with loss=robust.",
    )
    nll_weight: float = Field(
        0.0,
        ge=0,
        description="Add this times the chosen completions' per-token NLL "
        "(RPO, Pang et al. 2024): keeps chosen answers likely while the margin grows.",
    )
    precompute_reference: bool = Field(
        False,
        description="Compute the reference log-probs of every pair once "
        "before training (and free the frozen copy under full fine-tuning).",
    )
    reference_cache: bool = Field(
        True,
        description="Keep precomputed reference log-probs on disk, keyed on the "
        "model, tokenizer, chat template, data and precision.",
    )

    @model_validator(mode="after")
    def _smoothing_needs_a_variant(self) -> "DPOOptions":
        if self.label_smoothing and self.loss not in ("sigmoid", "robust"):
            raise ValueError(f"label_smoothing applies to loss=sigmoid or robust, not {self.loss}")
        return self


class DPO(Preference):
    """Objective: DPO and its variants on preference pairs, against a reference policy."""

    name = "dpo"
    options = DPOOptions
    #: On the embedded arithmetic pairs the pure loss lowers the chosen answers' likelihood along with the
    #: rejected ones (the task metric falls); the NLL term keeps them likely, so the demo job uses it.
    default_settings = {**Preference.default_settings, "{name}.nll_weight": 1.0}

    def loss(self, options: DPOOptions) -> Any:
        cls = VARIANTS[options.loss]
        if options.loss in ("sigmoid", "robust"):
            loss = cls(beta=options.beta, label_smoothing=options.label_smoothing)
        else:
            loss = cls(beta=options.beta)
        return WithChosenNLL(loss, options.nll_weight) if options.nll_weight else loss

    @lft.hookimpl
    def lft_callbacks(self, config: Any) -> Any:
        options = config.section(self.name)
        if not isinstance(options, DPOOptions) or not options.precompute_reference:  # a subclass's own options
            return None
        return [precompute_callback(options.reference_cache)]

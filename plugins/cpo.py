"""CPO: contrastive preference optimisation, reference-free (Xu et al. 2024,
https://arxiv.org/abs/2401.08417): a DPO-like margin on the policy's own log-probs plus the NLL of
the chosen completion. The loss is in ``lft.losses.cpo``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from lft.losses.cpo import CPOLoss
from lft.losses.preference import WithChosenNLL
from lft.plugins.preference import Preference, PreferenceOptions


class CPOOptions(PreferenceOptions):
    beta: float = Field(0.1, gt=0, description="Scale of the log-prob margin (for ipo, its tau).")
    loss: Literal["sigmoid", "hinge", "ipo"] = Field(
        "sigmoid",
        description="sigmoid: -log sigmoid(beta h) (the paper); hinge: max(0, 1 - beta h); ipo: the per-token "
        "margin regressed onto 1/(2 beta).",
    )
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="Assumed rate of flipped labels (loss=sigmoid).")
    nll_weight: float = Field(
        1.0, ge=0, description="Weight of the chosen completions' per-token NLL (the paper's behaviour cloning term)."
    )

    @model_validator(mode="after")
    def _smoothing_needs_sigmoid(self) -> "CPOOptions":
        if self.label_smoothing and self.loss != "sigmoid":
            raise ValueError(f"label_smoothing applies to loss=sigmoid, not {self.loss}")
        return self


class CPO(Preference):
    """Objective: CPO on preference pairs (reference-free, with the chosen answers' NLL)."""

    name = "cpo"
    options = CPOOptions

    def loss(self, options: CPOOptions) -> Any:
        loss = CPOLoss(beta=options.beta, form=options.loss, label_smoothing=options.label_smoothing)
        return WithChosenNLL(loss, options.nll_weight) if options.nll_weight else loss

"""The ``guards`` config section: one sub-section per guard, each with ``enabled`` and its thresholds."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from lft.config import Section


class TemplateGuard(Section):
    enabled: bool = Field(
        default=True,
        description="Check the chat template: present, prefix-preserving, end-of-turn "
        "token trained, inference prompt equal to the training prompt.",
    )
    rows: int = Field(default=64, gt=0, description="Rows formatted and checked.")


class LintGuard(Section):
    enabled: bool = Field(
        default=True,
        description="Check the rows: empty answers, duplicates, truncation, "
        "answers that should differ and do not (a pair's two sides).",
    )


class ContaminationGuard(Section):
    enabled: bool = Field(
        default=True, description="Look for eval rows (and --against files) inside the training data."
    )
    against: list[str] = Field(
        default_factory=list,
        description="Extra files to check the training data against, e.g. a benchmark's questions.",
    )
    ngram: int = Field(default=13, ge=3, description="Words per n-gram.")
    overlap: float = Field(
        default=0.5,
        gt=0,
        le=1,
        description="A training row overlaps a row of another set when at least "
        "this fraction of the shorter row's n-grams appear in the other.",
    )
    drop: bool = Field(default=False, description="Drop the overlapping training rows before training.")


class OverfitGuard(Section):
    enabled: bool = Field(
        default=True, description="Follow the eval loss during training; warn when it rises while the train loss falls."
    )
    eval_points: int = Field(
        default=5, ge=1, description="Evaluations during training when trainer.eval_every is unset."
    )
    tolerance: float = Field(
        default=0.05, ge=0, description="Relative rise of the eval loss above its best that counts as rising."
    )
    early_stopping: bool = Field(
        default=False, description="Stop when the eval loss has not improved for `patience` evaluations."
    )
    patience: int = Field(default=3, ge=1, description="Evaluations without improvement before early stopping.")
    min_delta: float = Field(
        default=0.0, ge=0, description="Smallest decrease of the eval loss that counts as improvement."
    )
    restore_best: bool = Field(
        default=False,
        description="At the end, load the trainable weights of the best evaluation (kept in memory) before saving.",
    )


class RepetitionGuard(Section):
    enabled: bool = Field(
        default=True,
        description="Sample answers on held-out prompts before and after training; warn "
        "when the tuned model repeats itself or fails to stop more than the base.",
    )
    samples: int = Field(default=16, ge=1, description="Held-out prompts sampled.")
    max_new_tokens: int = Field(default=48, gt=0)
    temperature: float = Field(default=0.7, gt=0)
    margin: float = Field(
        default=0.1, ge=0, description="Allowed rise of the repetition rate or the no-stop rate over the base."
    )


class ForgettingGuard(Section):
    enabled: bool = Field(
        default=True,
        description="Compare the tuned model with the base on general text (perplexity, "
        "and KL on the base model's own samples) and on the answers to everyday prompts.",
    )
    prompts: str | None = Field(
        default=None,
        description="Everyday prompts (JSONL rows with 'prompt') that base and tuned "
        "answer; empty means lft's shipped set. Keep them apart from the task.",
    )
    everyday: int = Field(default=32, ge=0, description="Everyday prompts answered (0 turns the behaviour check off).")
    conversations: int = Field(
        default=8,
        ge=0,
        description="Two-turn conversations answered: one of the task's own exchanges, then an everyday question.",
    )
    answer_tokens: int = Field(
        default=96, gt=0, description="Longest answer to an everyday prompt, in tokens (greedy)."
    )
    max_degenerate_increase: float = Field(
        default=0.15,
        ge=0,
        le=1,
        description="Warn when the share of degenerate "
        "answers (loops, counting, the task's format, no stop, collapse) rises "
        "by more than this over the base's.",
    )
    data: str | None = Field(
        default=None,
        description="Rows with 'text' (perplexity) and/or 'prompt' (samples for the KL); "
        "empty means lft's embedded general text.",
    )
    samples: int = Field(
        default=16,
        ge=1,
        description="General rows used: their texts for the perplexity, their prompts "
        "for the base model's samples (the KL).",
    )
    max_new_tokens: int = Field(default=32, gt=0, description="Length of the base model's samples.")
    max_ppl_increase: float = Field(
        default=0.2, ge=0, description="Warn when the perplexity rises by more than this fraction."
    )
    max_kl: float = Field(
        default=0.5, ge=0, description="Warn when KL(base || tuned) exceeds this many nats per token."
    )
    mix_data: str | None = Field(
        default=None,
        description="General rows mixed into the training data when mix_ratio > 0, in "
        "the objective's format; empty means lft's embedded general conversations, and "
        "'self' the base model's own answers to lft's general prompts (SFT).",
    )
    mix_ratio: float = Field(default=0.0, ge=0, lt=1, description="Fraction of the training rows taken from mix_data.")


class RankGuard(Section):
    enabled: bool = Field(
        default=True, description="Suggest a higher adapter rank when the eval loss plateaus well above the train loss."
    )
    low: int = Field(
        default=16, gt=0, description="Ranks up to this are advised to go higher when the eval loss plateaus."
    )
    plateau: float = Field(
        default=0.01,
        ge=0,
        description="Relative improvement over the second half of training below which the eval loss has plateaued.",
    )
    gap: float = Field(
        default=0.25, ge=0, description="Relative gap of eval loss over train loss that counts as well above."
    )


class GuardsOptions(Section):
    """Guards against the known fine-tuning pitfalls, on in every run (see guards.md)."""

    enabled: bool = Field(default=True, description="Run the guards at all.")
    strict: bool = Field(default=False, description="Preflight warnings (template, data, contamination) stop the run.")
    report: Literal["both", "html", "markdown", "none"] = Field(
        default="both", description="Run report written in the output folder: report.html, report.md, both or none."
    )
    template: TemplateGuard = Field(default_factory=TemplateGuard)
    lint: LintGuard = Field(default_factory=LintGuard)
    contamination: ContaminationGuard = Field(default_factory=ContaminationGuard)
    overfit: OverfitGuard = Field(default_factory=OverfitGuard)
    repetition: RepetitionGuard = Field(default_factory=RepetitionGuard)
    forgetting: ForgettingGuard = Field(default_factory=ForgettingGuard)
    rank: RankGuard = Field(default_factory=RankGuard)

    def on(self, name: str) -> bool:
        """Whether the guard ``name`` runs."""
        return self.enabled and getattr(self, name).enabled

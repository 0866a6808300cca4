"""Built-in reward functions for the online methods (ppo, grpo). Each is an extension plugin of its
own, selected like any other (``--plugin exact_answer``), and implements ``lft_reward`` exactly as
a third-party reward plugin would. When several are selected, lft adds up ``weight * scores``.

* ``exact_answer``: 1 when the completion's answer equals the row's ``answer`` column, else 0
  (the embedded task's checker, ``lft.data.task.score``);
* ``format``: 1 when the completion matches a regular expression, else 0;
* ``reward_model``: the score of a reward model trained by ``lft run --plugin reward``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

import lft
from lft.config import Section
from lft.data import task


class RewardPlugin:
    """Base of the built-in rewards: an extension with its own config section named after it."""

    name = "reward"
    kind = "extension"
    options: type[Section] = Section

    @lft.hookimpl
    def lft_add_config(self, register: Any) -> None:
        register(self.name, self.options)


class ExactAnswerOptions(Section):
    column: str = Field("answer", description="The data column holding the expected answer.")
    weight: float = Field(1.0, description="Weight of this reward when several are active.")


class ExactAnswer(RewardPlugin):
    """Reward: 1.0 when the completion's final answer equals the data's answer, else 0.0."""

    name = "exact_answer"
    options = ExactAnswerOptions

    def score(self, completion: str, answer: Any) -> float:
        return task.score(completion, str(answer))

    @lft.hookimpl
    def lft_reward(self, prompts: list, completions: list, batch: dict, config: Any) -> Any:
        opts = config.section(self.name)
        answers = batch.get(opts.column)
        if answers is None:
            columns = ", ".join(k for k, v in batch.items() if isinstance(v, list)) or "none"
            raise lft.DataError(
                f"exact_answer needs a {opts.column!r} column in the data (set exact_answer.column "
                f"to use another); the rows have {columns}"
            )
        return {
            "name": self.name,
            "scores": [self.score(c, a) for c, a in zip(completions, answers)],
            "weight": opts.weight,
        }


class FormatOptions(Section):
    pattern: str = Field(
        r"= -?\d+\. The answer is -?\d+\.$",
        description="Regular expression a well-formed completion matches (re.search, "
        "after stripping whitespace). The default fits the embedded task.",
    )
    weight: float = Field(0.5, description="Weight of this reward when several are active.")

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression ({exc})") from None
        return value


class Format(RewardPlugin):
    """Reward: 1.0 when the completion matches ``format.pattern``, else 0.0."""

    name = "format"
    options = FormatOptions

    @lft.hookimpl
    def lft_reward(self, prompts: list, completions: list, batch: dict, config: Any) -> Any:
        opts = config.section(self.name)
        pattern = re.compile(opts.pattern, re.DOTALL)
        scores = [float(pattern.search(c.strip()) is not None) for c in completions]
        return {"name": self.name, "scores": scores, "weight": opts.weight}


class RewardModelOptions(Section):
    path: str | None = Field(None, description="A reward model folder saved by `lft run --plugin reward`.")
    weight: float = Field(1.0, description="Weight of this reward when several are active.")
    batch_size: int = Field(16, gt=0, description="Completions scored per forward pass.")

    @field_validator("path")
    @classmethod
    def _exists(cls, value: str | None) -> str | None:
        if value and not (Path(value).expanduser() / "config.json").is_file():
            raise ValueError(f"no reward model at {value} (expected a folder saved by `lft run --plugin reward`)")
        return value


class RewardModel(RewardPlugin):
    """Reward: the score a trained reward model gives each (prompt, completion)."""

    name = "reward_model"
    options = RewardModelOptions

    def __init__(self) -> None:
        self._loaded: tuple[str, Any] | None = None

    def scorer(self, path: str, device: Any) -> Any:
        if self._loaded is None or self._loaded[0] != path:
            from lft.adapters import scorer as scorers

            self._loaded = (path, scorers.load(path))
        scorer = self._loaded[1]
        if device is not None:
            scorer.model.to(device)
        return scorer

    @lft.hookimpl
    def lft_reward(self, prompts: list, completions: list, batch: dict, config: Any) -> Any:
        opts = config.section(self.name)
        if not opts.path:
            raise lft.ConfigError(
                "reward_model.path is not set; give the folder of a model trained with `lft run --plugin reward`"
            )
        ids = batch.get("completion_ids")
        scorer = self.scorer(opts.path, getattr(ids, "device", None))
        return {"name": self.name, "scores": scorer.score(prompts, completions, opts.batch_size), "weight": opts.weight}

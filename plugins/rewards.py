"""Built-in reward functions for the online methods (ppo, grpo). Each is an extension plugin of its
own, selected like any other (``--plugin exact_answer``), and implements ``lft_reward`` exactly as
a third-party reward plugin would. When several are selected, lft adds up ``weight * scores``.

* ``exact_answer``: 1 when the completion's final answer equals the row's ``answer`` column, else
  0: numbers as numbers, words and phrases as normalised text, ``\\boxed{}`` and "the answer is"
  forms, and mathematical answers through math-verify when it is installed;
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
    math_verify: bool = Field(
        True,
        description="Compare mathematical answers (fractions, expressions, LaTeX) with the math-verify "
        "package when it is installed (pip install math-verify); numbers and text are compared without it.",
    )


_BOXED = re.compile(r"\\boxed\s*\{")
_STATED = re.compile(r"(?:final answer|answer)\s*(?:is|:|=)\s*(.+?)(?:\.\s|\.$|\n|$)", re.IGNORECASE)
_NUMERIC = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?")


def boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (braces balanced), if any."""
    starts = [m.end() for m in _BOXED.finditer(text)]
    if not starts:
        return None
    depth, start = 1, starts[-1]
    for i in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[start:i]
    return None


def normalise(text: str) -> str:
    """Lower case, one space between words, no surrounding quotes, markup or final punctuation."""
    text = re.sub(r"\s+", " ", text.replace("**", "").replace("$", "")).strip().lower()
    return text.strip(" \"'`*_").rstrip(".!;:,").strip()


def _number(text: str) -> float | None:
    text = text.replace(",", "").strip()
    try:
        return float(text)
    except ValueError:
        return None


def answer_matches(completion: str, expected: Any, use_math_verify: bool = True) -> bool:
    """Whether the completion's final answer is ``expected``: the last ``\\boxed{}``, else the
    text after the last "answer is" / "answer:", else (a numeric answer) the last number, else
    the completion's last line; compared as numbers when both are numbers, with math-verify for
    other mathematical answers when it is installed, else as normalised text."""
    expected = str(expected).strip()
    stated = _STATED.findall(completion)
    found = boxed(completion)
    if found is None and stated:
        found = stated[-1]
    want = _number(expected)
    if found is None and want is not None:
        numbers = _NUMERIC.findall(completion)
        found = numbers[-1] if numbers else None
    if found is None:
        lines = [line for line in completion.strip().splitlines() if line.strip()]
        found = lines[-1] if lines else ""
    got = _number(normalise(found))
    if want is not None and got is None:  # "the answer is 23 apples"
        numbers = _NUMERIC.findall(found)
        got = _number(numbers[0]) if numbers else None
    if want is not None and got is not None:
        return abs(got - want) <= 1e-9 * max(1.0, abs(want))
    if normalise(found) == normalise(expected):
        return True
    if use_math_verify and any(c.isdigit() or c in "\\^/" for c in expected):
        return _math_equal(found, expected)
    return False


def _math_equal(found: str, expected: str) -> bool:
    try:
        import math_verify
    except ImportError:
        return False
    try:
        gold = math_verify.parse(expected if "$" in expected else f"${expected}$")
        answer = math_verify.parse(found if "$" in found else f"${found}$")
        return bool(gold and answer and math_verify.verify(gold, answer))
    except Exception:  # an answer math-verify cannot parse is not a match
        return False


class ExactAnswer(RewardPlugin):
    """Reward: 1.0 when the completion's final answer equals the data's answer (a number, a word
    or a phrase, a ``\\boxed{}`` expression), else 0.0; see ``answer_matches``."""

    name = "exact_answer"
    options = ExactAnswerOptions

    def score(self, completion: str, answer: Any, use_math_verify: bool = True) -> float:
        return float(answer_matches(completion, answer, use_math_verify))

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
            "scores": [self.score(c, a, opts.math_verify) for c, a in zip(completions, answers)],
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

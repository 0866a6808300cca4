"""Calling the ``lft_reward`` hook: every selected reward plugin scores the completions, and the
scores are checked and added up with their weights.

A reward function that raises, returns the wrong number of scores, or returns a score that is not
a finite number stops the run with one line that names the function and the sample.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from lft.errors import LftError, PluginError


class RewardError(LftError):
    """A reward function failed on a sample."""


@dataclass
class Rewards:
    """The combined reward of each completion and each function's own scores."""

    total: torch.Tensor
    scores: dict[str, torch.Tensor] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)


def reward_plugins(hook: Any) -> list[str]:
    """Names of the selected plugins that implement ``lft_reward``."""
    return [impl.plugin_name for impl in hook.lft_reward.get_hookimpls()]


def _shorten(value: Any, width: int = 60) -> str:
    text = " ".join(str(value).split())
    return repr(text if len(text) <= width else text[: width - 3] + "...")


def _sample(rows: dict, index: int) -> dict:
    return {k: (v[index : index + 1] if isinstance(v, (list, tuple, torch.Tensor)) else v) for k, v in rows.items()}


def _call(impl: Any, **kwargs: Any) -> Any:
    return impl.function(*[kwargs[name] for name in impl.argnames])


def _find_failure(hook: Any, prompts: list, completions: list, batch: dict, config: Any, exc: Exception) -> RewardError:
    """Call each reward plugin alone, then on one sample at a time, to name what raised."""
    for impl in hook.lft_reward.get_hookimpls():
        try:
            _call(impl, prompts=prompts, completions=completions, batch=batch, config=config)
            continue
        except Exception as own:  # this plugin is the one that fails on the batch
            culprit, first = impl, own
        for i in range(len(completions)):
            try:
                _call(
                    culprit,
                    prompts=prompts[i : i + 1],
                    completions=completions[i : i + 1],
                    batch=_sample(batch, i),
                    config=config,
                )
            except Exception as alone:
                return RewardError(
                    f"reward function {culprit.plugin_name!r} raised {type(alone).__name__}: "
                    f"{str(alone).splitlines()[0] if str(alone) else ''} on sample {i} "
                    f"(prompt {_shorten(prompts[i])}, completion {_shorten(completions[i])})"
                )
        return RewardError(
            f"reward function {culprit.plugin_name!r} raised {type(first).__name__}: {first} "
            f"on a batch of {len(completions)} completions (no single sample fails alone)"
        )
    return RewardError(f"the reward hook raised {type(exc).__name__}: {exc}")


def score(hook: Any, prompts: list, completions: list, batch: dict, config: Any) -> Rewards:
    """Ask every selected reward plugin for scores and add up ``weight * scores``.

    :param batch: the rollout batch (with the data's extra columns, one entry per completion).
    :raises RewardError: naming the function and the sample when a function raises or returns a
        score that is not a finite number.
    """
    n = len(completions)
    try:
        results = hook.lft_reward(prompts=prompts, completions=completions, batch=batch, config=config)
    except LftError:
        raise
    except Exception as exc:
        raise _find_failure(hook, prompts, completions, batch, config, exc) from exc
    total = torch.zeros(n, dtype=torch.float32)
    out = Rewards(total)
    for result in results:
        if result is None:
            continue
        if not isinstance(result, dict) or not {"name", "scores"} <= set(result):
            raise PluginError(
                f"a reward plugin returned {type(result).__name__} {_shorten(result)}; expected "
                f"{{'name': ..., 'scores': [...], 'weight': ...}}"
            )
        name = str(result["name"])
        values = result["scores"]
        values = values.detach().float().cpu().tolist() if torch.is_tensor(values) else list(values)
        if len(values) != n:
            raise RewardError(f"reward function {name!r} returned {len(values)} scores for {n} completions")
        for i, value in enumerate(values):
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise RewardError(
                    f"reward function {name!r} returned {_shorten(value)} (not a number) for sample {i} "
                    f"(prompt {_shorten(prompts[i])})"
                ) from None
            if not math.isfinite(value):
                raise RewardError(
                    f"reward function {name!r} returned {value} for sample {i} (prompt "
                    f"{_shorten(prompts[i])}, completion {_shorten(completions[i])})"
                )
        weight = float(result.get("weight", 1.0))
        tensor = torch.tensor(values, dtype=torch.float32)
        if name in out.scores:
            raise PluginError(f"two reward plugins report the name {name!r}; reward names must be unique")
        out.scores[name] = tensor
        out.weights[name] = weight
        total += weight * tensor
    return out

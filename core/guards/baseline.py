"""The prompting baseline: does fine-tuning beat what a good prompt gets from the base model?

Before training, the base model answers the task metric's held-out prompts twice more:

* with a system prompt: ``eval.system_prompt``, else the training data's own (the first system
  message in its rows), else the task's instruction (``lft.data.task.INSTRUCTION``);
* with ``eval.shots`` solved examples from the training rows in front of the question, as earlier
  user and assistant turns of the conversation.

After training, the fine-tune's task metric is compared with the better of the two: when it does not
beat it by more than twice the standard error of the difference of the two accuracies (the noise of
measuring on that many prompts), the ``baseline`` finding says so and what to try.
"""

from __future__ import annotations

import math
import random
from typing import Any, Sequence

from lft.data import task
from lft.guards.findings import Finding, skipped


def _text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and isinstance(value[-1], dict):
        return str(value[-1].get("content", "")) or None
    return None


def system_prompt_of(rows: Sequence[dict], limit: int = 200) -> str | None:
    """The first system message among the first ``limit`` rows (any column holding messages)."""
    for row in list(rows)[:limit]:
        for value in row.values():
            if isinstance(value, list):
                for message in value:
                    if isinstance(message, dict) and message.get("role") == "system" and message.get("content"):
                        return str(message["content"])
    return None


def shot_examples(rows: Sequence[dict], row_texts: Any, k: int, seed: int) -> list[tuple[str, str]]:
    """``k`` (question, answer) pairs from the training rows, as the objective reads them
    (``row_texts``); the task's own solved training examples when the rows hold no answers."""
    found = []
    for row in list(rows)[:2000]:
        texts = row_texts(row)
        question = _text(texts.prompts[0]) if texts.prompts else None
        answer = _text(texts.answers[0]) if texts.answers else None
        if question and answer:
            found.append((question, answer))
    if len(found) < k:
        from lft.data.files import read_rows

        found = []
        for row in read_rows(str(task.path("sft", "train"))).rows[:2000]:
            messages = row["messages"]
            found.append((messages[0]["content"], messages[1]["content"]))
    return random.Random(seed).sample(found, min(k, len(found)))


def prompts_with(rows: Sequence[dict], system: str | None = None, shots: Sequence[tuple[str, str]] = ()) -> list:
    """Each row's prompt as a conversation: the system prompt, the solved examples, then the question."""
    out = []
    for row in rows:
        head = [{"role": "system", "content": system}] if system else []
        for question, answer in shots:
            head += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        prompt = row["prompt"]
        tail = list(prompt) if isinstance(prompt, list) else [{"role": "user", "content": str(prompt)}]
        if head and tail and tail[0].get("role") == "system":  # the row's own system prompt comes first
            head, tail = [tail[0], *[m for m in head if m["role"] != "system"]], tail[1:]
        out.append(head + tail)
    return out


def measure(model: Any, tokenizer: Any, rows: list[dict], system: str, shots: list, settings: Any) -> dict:
    """The task accuracy of ``model`` on ``rows`` with the system prompt and with the examples."""
    from lft.use import evaluate

    out = {}
    for name, prompts, extra in (
        ("system_prompt", prompts_with(rows, system=system), {"system_prompt": system}),
        ("shots", prompts_with(rows, shots=shots), {"shots": len(shots)}),
    ):
        given = [{**row, "prompt": prompt} for row, prompt in zip(rows, prompts)]
        metric = evaluate.task_metric(model, tokenizer, given, settings.max_new_tokens, settings.batch_size)
        out[name] = {"task_accuracy": metric["accuracy"], **extra}
    return out


def noise(a: float, b: float, n: int) -> float:
    """Twice the standard error of the difference of two accuracies, each measured on ``n`` prompts."""
    return 2 * math.sqrt((a * (1 - a) + b * (1 - b)) / max(n, 1))


def verdict(summary: dict) -> Finding:
    """The ``baseline`` finding: the fine-tune against the better prompting baseline."""
    baselines = summary.get("baselines") or {}
    after = (summary.get("after") or {}).get("task_accuracy")
    if not baselines or after is None:
        return skipped("baseline", "no task metric measured before and after training")
    label = {"system_prompt": "with a system prompt", "shots": "with {shots} examples in the prompt"}
    best_name = max(baselines, key=lambda k: baselines[k]["task_accuracy"])
    best = baselines[best_name]
    described = label[best_name].format(**best)
    n = int(summary.get("baseline_rows") or 100)
    margin = noise(after, best["task_accuracy"], n)
    finding = Finding(
        "baseline",
        detail=f"base {described} {best['task_accuracy']:.2f}; fine-tuned {after:.2f} (noise +-{margin:.2f}, "
        f"{n} prompts)",
        data={"best": best_name, "noise": margin},
    )
    if after - best["task_accuracy"] <= margin:
        finding.raise_to(
            "warning",
            f"the base model {described} scores {best['task_accuracy']:.2f}; the fine-tune {after:.2f}: consider "
            "not fine-tuning (fine-tuning did not beat the prompt by more than the noise of "
            f"{margin:.2f}); try a better prompt or more examples in it (eval.system_prompt, eval.shots), and "
            "fine-tune only for what prompting cannot reach: more data, more steps, or another method",
        )
    return finding

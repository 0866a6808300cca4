"""Everyday prompts, base against tuned: the forgetting guard's behaviour check.

Perplexity and KL on general text can move little while the answers a user reads fall apart: a
haiku that loops on "its beauty", three tips that become a count to 17, "What is the capital of
France?" answered in the task's format. So the guard also answers a small set of everyday prompts
(``core/assets/everyday-prompts.jsonl``, or ``guards.forgetting.prompts``), and a few two-turn
conversations (one of the task's own exchanges, then an everyday question), greedily with the
base model before training and with the tuned model after. Each answer is checked for signs of
degeneration:

* ``repeats``: half or more of its token 3-grams repeat an earlier one (a loop);
* ``counts``: a counting loop: six or more consecutive numbers with next to nothing between them,
  as in "3. 1. 2. 3. 4. 5. 6.", or a numbered list that runs to ten and beyond;
* ``task format``: it uses two or more of the phrases that the task's answers share (each found in
  at least half of the training answers) and that no base answer to an everyday prompt uses, as
  in "... The answer is 25.";
* ``no stop``: it runs to the length limit where the base's answer to the same prompt stopped in
  under half of it;
* ``collapsed``: it is under a quarter of the length of the base's complete answer.

The last two compare with the base's answer to the same prompt, so they apply to the tuned model
only. The guard fires when the tuned model's answers degenerate clearly more often than the
base's did (``guards.forgetting.max_degenerate_increase``).
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

from lft.data import chat, task
from lft.guards import measure
from lft.objective import IGNORE_INDEX

EVERYDAY = task.ASSETS / "everyday-prompts.jsonl"
#: A share of repeated token 3-grams at or above this makes an answer a loop (docs/guards.md has
#: the measured spread: most fluent answers of 96 tokens stay under 0.2).
REPEATS = 0.5
#: This many consecutive integers with at most ``COUNT_GAP`` words between them on average make a
#: counting loop; a numbered list counts as one from ``LIST_RUN`` items.
COUNT_RUN = 6
COUNT_GAP = 2
LIST_RUN = 10
#: An answer in the task's format uses this many of its shared phrases.
SIGNATURE_HITS = 2
#: An answer under this share of the base answer's length has collapsed (when the base's has at
#: least ``COLLAPSE_MIN`` tokens).
COLLAPSE = 0.25
COLLAPSE_MIN = 24
#: A phrase (word 3-gram, numbers as ``0``) shared by this share of the task's answers marks its format.
SIGNATURE_SHARE = 0.5


def read_prompts(path: str | Path | None, limit: int) -> list[Any]:
    """Prompts (strings or lists of messages) from a JSONL file of rows with ``prompt``."""
    from lft.data.files import read_rows
    from lft.errors import DataError

    rows = read_rows(str(path or EVERYDAY))
    prompts: list[Any] = []
    for row, where in zip(rows.rows[:limit], rows.where[:limit]):
        prompt = row.get("prompt")
        if not isinstance(prompt, (str, list)) or not prompt:
            raise DataError(
                f"{where}: guards.forgetting.prompts rows need a 'prompt' (a string or a list of "
                f"messages); found {', '.join(row) or 'no columns'}"
            )
        prompts.append(prompt)
    return prompts


def first_exchange(feature: dict, stop: set[int]) -> tuple[list[int], list[int]] | None:
    """``(prompt ids, answer ids)`` of a formatted example's first trained span, the answer up to
    and including its end-of-turn token; None when it has no trained span that stops."""
    ids = next((v for k, v in feature.items() if k.endswith("input_ids") and isinstance(v, list)), None)
    labels = next((v for k, v in feature.items() if k.endswith("labels") and isinstance(v, list)), None)
    if ids is None or labels is None:
        return None
    start = next((i for i, t in enumerate(labels) if t != IGNORE_INDEX), None)
    if not start:
        return None
    end = next((i for i in range(start, len(labels)) if labels[i] == IGNORE_INDEX or ids[i] in stop), None)
    if end is None or ids[end] not in stop:
        return None
    return list(ids[:start]), list(ids[start : end + 1])


def next_turn(tokenizer: Any, question: str) -> list[int] | None:
    """The tokens that follow an assistant's end-of-turn token to ask ``question`` as a new user
    turn and open the assistant's answer, as the chat template writes them."""
    marker_a, marker_b = "lft-first-question", "lft-first-answer"
    messages = [
        {"role": "user", "content": marker_a},
        {"role": "assistant", "content": marker_b},
        {"role": "user", "content": question},
    ]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception:  # a template that cannot write a second turn
        return None
    after = text.find(marker_b)
    stops = [tokenizer.decode([i]) for i in sorted(chat.end_of_turn_ids(tokenizer))]
    ends = [(text.find(s, after), s) for s in stops if s and text.find(s, after) >= 0]
    if after < 0 or not ends:
        return None
    position, stop = min(ends)
    return list(tokenizer(text[position + len(stop) :], add_special_tokens=False)["input_ids"])


def conversations(tokenizer: Any, features: list[dict], questions: list[Any], count: int) -> list[list[int]]:
    """Two-turn prompts: one of the task's own exchanges (prompt and reference answer), then an
    everyday question, ready for the assistant's second answer."""
    stop = chat.end_of_turn_ids(tokenizer)
    plain = [q for q in questions if isinstance(q, str)]
    out: list[list[int]] = []
    for feature in features:
        if len(out) >= min(count, len(plain)):
            break
        exchange = first_exchange(feature, stop)
        follow = next_turn(tokenizer, plain[len(out)]) if exchange else None
        if exchange and follow:
            out.append(exchange[0] + exchange[1] + follow)
    return out


def task_answers(tokenizer: Any, features: list[dict], limit: int = 200) -> list[str]:
    """The text of the first trained answer of up to ``limit`` training examples."""
    stop = chat.end_of_turn_ids(tokenizer)
    out = []
    for feature in features[:limit]:
        exchange = first_exchange(feature, stop)
        if exchange:
            out.append(tokenizer.decode(exchange[1], skip_special_tokens=True))
    return out


def words(text: str) -> list[str]:
    return [re.sub(r"\d+([.,]\d+)*", "0", w) for w in text.lower().split()]


def trigrams(text: str) -> set[tuple[str, ...]]:
    w = words(text)
    return {tuple(w[i : i + 3]) for i in range(len(w) - 2)}


def task_signature(task_answers: list[str], everyday_answers: list[str]) -> list[list[str]]:
    """Phrases the task's answers share (in at least ``SIGNATURE_SHARE`` of them) and that no
    everyday answer of the base model uses: the task's format."""
    if not task_answers:
        return []
    counts = Counter(g for text in task_answers for g in trigrams(text))
    common = {g for g, n in counts.items() if n >= SIGNATURE_SHARE * len(task_answers)}
    ordinary = set().union(*(trigrams(t) for t in everyday_answers)) if everyday_answers else set()
    return sorted(list(g) for g in common - ordinary)


def counting(text: str) -> tuple[int, float]:
    """The longest run of consecutive integers (n, n+1, n+2, ...) in ``text``, and the mean number
    of words between its numbers. "3. 1. 2. 3. 4. 5. 6." gives (6, 0.0): the run 1 to 6."""
    tokens = text.split()[:600]
    numbers = [(i, int(m.group(1))) for i, w in enumerate(tokens) for m in [re.fullmatch(r"\W*(\d+)\W*", w)] if m]
    best, best_gap = (1, 0.0) if numbers else (0, 0.0)
    start = 0
    for k in range(1, len(numbers) + 1):
        if k < len(numbers) and numbers[k][1] == numbers[k - 1][1] + 1:
            continue
        length = k - start
        if length > best:
            span = numbers[k - 1][0] - numbers[start][0] + 1
            best, best_gap = length, (span - length) / max(1, length - 1)
        start = k
    return best, best_gap


def signals(answer: dict, signature: list[list[str]], base: dict | None = None) -> list[str]:
    """The signs of degeneration in one answer (``{"ids", "stopped", "text"}``); ``base`` is the
    base model's answer to the same prompt, for the comparisons."""
    found = []
    if measure.repetition_rate(answer["ids"]) >= REPEATS:
        found.append("repeats")
    run, gap = counting(answer["text"])
    if (run >= COUNT_RUN and gap <= COUNT_GAP) or run >= LIST_RUN:
        found.append("counts")
    if signature and len(trigrams(answer["text"]) & {tuple(g) for g in signature}) >= SIGNATURE_HITS:
        found.append("task format")
    if base is not None and base["stopped"]:
        if not answer["stopped"] and len(answer["ids"]) >= 2 * len(base["ids"]):
            found.append("no stop")
        if len(base["ids"]) >= COLLAPSE_MIN and len(answer["ids"]) < COLLAPSE * len(base["ids"]):
            found.append("collapsed")
    return found


def answer(
    model: Any, tokenizer: Any, prompts: list[list[int]], max_new_tokens: int, seed: int, temperature: float = 0.0
) -> list[dict]:
    """Answers to ``prompts``: greedy by default (what ``lft generate`` and ``lft chat`` give)."""
    samples = measure.sample(model, tokenizer, prompts, max_new_tokens, temperature, seed, batch_size=48)
    return [
        {"ids": ids, "stopped": stopped, "text": tokenizer.decode(ids, skip_special_tokens=True).strip()}
        for ids, stopped in samples
    ]


def compare(base: dict, after: dict, signature: list[list[str]]) -> dict:
    """Per-answer signals for base and tuned, the rates, and the pairs where the tuned model
    degenerated and the base did not (the worst first)."""
    rows = []
    for kind in ("everyday", "conversation"):
        for i, (b, a) in enumerate(zip(base.get(kind, []), after.get(kind, []))):
            rows.append(
                {
                    "kind": kind,
                    "prompt": base["questions"][kind][i],
                    "base": b["text"],
                    "tuned": a["text"],
                    "base_signals": signals(b, signature),
                    "tuned_signals": signals(a, signature, b),
                }
            )
    n = max(1, len(rows))
    rate = lambda key: sum(bool(r[key]) for r in rows) / n  # noqa: E731
    worse = [r for r in rows if r["tuned_signals"] and not r["base_signals"]]
    worse.sort(key=lambda r: -len(r["tuned_signals"]))
    return {
        "answers": len(rows),
        "base_rate": rate("base_signals"),
        "tuned_rate": rate("tuned_signals"),
        "by_signal": dict(Counter(s for r in rows for s in r["tuned_signals"])),
        "base_by_signal": dict(Counter(s for r in rows for s in r["base_signals"])),
        "worst": worse[:5],
        "rows": rows,
    }

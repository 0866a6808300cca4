"""Data lint: rows that train nothing useful or train it twice.

Empty or whitespace-only trained answers, exact duplicate rows, answers that should differ and do
not (a preference pair's two sides), and examples that will be truncated at ``data.max_length``
(counted by the formatting itself). Which texts of a row are answers is the objective's to say
(``Objective.row_texts``).
"""

from __future__ import annotations

import json
from typing import Any, Callable

from lft.data.chat import turn_texts
from lft.guards.findings import Finding
from lft.objective import RowTexts


def completions(texts: RowTexts) -> list[str]:
    """Every trained text of a row's answers: a string, or the assistant turns of messages (a turn
    without a role counts as the assistant's)."""
    return [a for answer in texts.answers for a in turn_texts(answer, lambda role: role in ("assistant", None))]


def _flatten(value: Any) -> str:
    if isinstance(value, list):
        return "\n".join(_flatten(v) for v in value)
    if isinstance(value, dict):
        return _flatten(value.get("content", ""))
    return value if isinstance(value, str) else ""


def lint_rows(
    rows: Any,
    row_texts: Callable[[dict], RowTexts],
    truncated: int | None = None,
    longest: int | None = None,
    max_length: int | None = None,
    examples: int = 3,
) -> Finding:
    """Lint the rows of one data source, read by ``row_texts`` (the objective's); ``truncated``
    and ``longest`` come from formatting them."""
    finding = Finding("lint")
    empty, same, duplicates = [], [], []
    seen: dict[str, str] = {}
    for row, where in zip(rows.rows, rows.where):
        texts = row_texts(row)
        if any(not a.strip() for a in completions(texts)):
            empty.append(where)
        if any(_flatten(a).strip() == _flatten(b).strip() for a, b in texts.contrasts):
            same.append(where)
        key = json.dumps(row, sort_keys=True, ensure_ascii=False, default=str)
        if key in seen:
            duplicates.append(f"{where} repeats {seen[key]}")
        else:
            seen[key] = where
    n = len(rows)
    for found, what in (
        (empty, "rows have an empty or whitespace-only completion, which teaches the model to answer with nothing"),
        (
            duplicates,
            "rows are exact duplicates of earlier rows, which weighs them double and leaks them into a held-out split",
        ),
        (
            same,
            "rows have two answers that should differ and are identical (a preference pair's "
            "two sides), which carries no preference",
        ),
    ):
        if found:
            finding.raise_to("warning", f"{len(found)} of {n} {what}; e.g. {found[0]}")
            finding.examples += found[:examples]
    if truncated:
        finding.raise_to(
            "warning",
            f"{truncated} of {n} rows are longer than data.max_length={max_length} tokens "
            f"(longest {longest}) and will be cut, often before the end-of-turn token; raise "
            "data.max_length or set data.truncation=drop",
        )
    finding.data.update(
        rows=n,
        empty=len(empty),
        duplicates=len(duplicates),
        identical_answers=len(same),
        truncated=truncated or 0,
        longest=longest,
    )
    finding.detail = (
        f"{n} rows"
        + (f", longest {longest} tokens" if longest else "")
        + ("" if finding.fired else ", no empty, duplicate or identical-answer rows")
    )
    return finding

"""Data lint: rows that train nothing useful or train it twice.

Empty or whitespace-only completions, exact duplicate rows, chosen identical to rejected, and
examples that will be truncated at ``data.max_length`` (counted by the formatting itself).
"""

from __future__ import annotations

import json
from typing import Any

from lft.guards.findings import Finding


def _answers(value: Any) -> list[str]:
    """The trained texts in a completion-like value: a string, or the assistant turns of messages."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [m.get("content") for m in value if isinstance(m, dict) and m.get("role", "assistant") == "assistant"
                and isinstance(m.get("content"), str)]
    return []


def completions(row: dict) -> list[str]:
    """Every trained text of a row, in any of lft's data formats."""
    if "messages" in row:
        return _answers(row["messages"])
    out: list[str] = []
    for key in ("completion", "chosen", "rejected", "text"):
        if key in row:
            out += _answers(row[key])
    return out


def _flatten(value: Any) -> str:
    if isinstance(value, list):
        return "\n".join(_flatten(v) for v in value)
    if isinstance(value, dict):
        return _flatten(value.get("content", ""))
    return value if isinstance(value, str) else ""


def lint_rows(rows: Any, truncated: int | None = None, longest: int | None = None, max_length: int | None = None,
              examples: int = 3) -> Finding:
    """Lint the rows of one data source; ``truncated``/``longest`` come from formatting them."""
    finding = Finding("lint")
    empty, same, duplicates = [], [], []
    seen: dict[str, str] = {}
    for row, where in zip(rows.rows, rows.where):
        answers = completions(row)
        if any(not a.strip() for a in answers):
            empty.append(where)
        if "chosen" in row and "rejected" in row and _flatten(row["chosen"]).strip() == _flatten(row["rejected"]).strip():
            same.append(where)
        key = json.dumps(row, sort_keys=True, ensure_ascii=False, default=str)
        if key in seen:
            duplicates.append(f"{where} repeats {seen[key]}")
        else:
            seen[key] = where
    n = len(rows)
    for found, what in ((empty, "rows have an empty or whitespace-only completion, which teaches the model to "
                                "answer with nothing"),
                        (duplicates, "rows are exact duplicates of earlier rows, which weighs them double and leaks "
                                     "them into a held-out split"),
                        (same, "preference rows have chosen identical to rejected, which carries no preference")):
        if found:
            finding.raise_to("warning", f"{len(found)} of {n} {what}; e.g. {found[0]}")
            finding.examples += found[:examples]
    if truncated:
        finding.raise_to("warning", f"{truncated} of {n} rows are longer than data.max_length={max_length} tokens "
                         f"(longest {longest}) and will be cut, often before the end-of-turn token; raise "
                         "data.max_length or set data.truncation=drop")
    finding.data.update(rows=n, empty=len(empty), duplicates=len(duplicates), chosen_is_rejected=len(same),
                        truncated=truncated or 0, longest=longest)
    finding.detail = (f"{n} rows" + (f", longest {longest} tokens" if longest else "")
                      + ("" if finding.fired else ", no empty, duplicate or identical-pair rows"))
    return finding

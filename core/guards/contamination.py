"""Contamination: training rows that contain eval rows (or rows of other files, such as a benchmark).

Text is compared after normalisation (Unicode NFKC, lower case, every run of non-word characters
becomes one space), and only the content: system messages are left out, since one shared system
prompt would make every row look alike. Two tests:

* **exact**: the whole content of a training row, or one of its prompts (a field or turn that is
  not an answer) of at least ``MIN_UNIT_WORDS`` words, equals the content of a reference row or one
  of its fields or turns. Answers alone are not compared: "26 - 20 = 6." may rightly answer one
  question and be the rejected answer to another;
* **n-gram**: at least ``overlap`` of the word n-grams of the shorter of the two rows appear in the
  other (the overlap coefficient of their n-gram sets). Counting a single shared 13-gram, as some
  benchmark audits do, flags rows generated from one template that differ only in a number; the
  coefficient does not, while a copied question or a pasted passage scores near 1. Rows shorter
  than ``n`` words have no n-gram and are compared exactly only.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

from lft.data.chat import turn_texts
from lft.guards.findings import Finding
from lft.objective import RowTexts

MIN_UNIT_WORDS = 4
#: An n-gram found in more reference rows than this is boilerplate; it is not looked up.
MAX_POSTINGS = 200
_NON_WORD = re.compile(r"[\W_]+")


def words(text: str) -> list[str]:
    return _NON_WORD.sub(" ", unicodedata.normalize("NFKC", text).lower()).split()


def units(row: dict) -> list[str]:
    """The texts of a row in any format: each string field, and each non-system turn of message lists."""
    return [text for value in row.values() for text in turn_texts(value, lambda role: role != "system")]


def prompt_units(texts: RowTexts) -> list[str]:
    """The prompt texts of a row (``Objective.row_texts``): no answer, no assistant turn."""
    return [t for prompt in texts.prompts for t in turn_texts(prompt, lambda role: role not in ("system", "assistant"))]


def ngrams(tokens: list[str], n: int) -> set[int]:
    return {hash(tuple(tokens[i : i + n])) for i in range(len(tokens) - n + 1)}


@dataclass
class Overlap:
    train: int  # row index in the training rows
    other: int  # row index in the reference rows
    kind: str  # "exact" or "ngram"
    score: float  # 1.0 for exact, else the overlap coefficient


class Index:
    """Exact texts and n-gram postings of a reference set (eval rows, a benchmark)."""

    def __init__(self, rows: list[dict], n: int):
        self.n = n
        self.exact: dict[str, int] = {}
        self.sizes: list[int] = []
        self.postings: dict[int, list[int]] = defaultdict(list)
        for index, row in enumerate(rows):
            parts = units(row)
            full = " ".join(w for p in parts for w in words(p))
            if full:
                self.exact.setdefault(full, index)
            for part in parts:
                tokens = words(part)
                if len(tokens) >= MIN_UNIT_WORDS:
                    self.exact.setdefault(" ".join(tokens), index)
            grams = ngrams(full.split(), n)
            self.sizes.append(len(grams))
            for gram in grams:
                self.postings[gram].append(index)

    def match(self, row: dict, threshold: float, prompts: Sequence[str] = ()) -> Overlap | None:
        """The best overlap of ``row`` (its whole text, or one of its ``prompts`` exactly)."""
        parts = units(row)
        full = " ".join(w for p in parts for w in words(p))
        if not full:
            return None
        candidates = [full] + [" ".join(t) for t in map(words, prompts) if len(t) >= MIN_UNIT_WORDS]
        for text in candidates:
            if text in self.exact:
                return Overlap(-1, self.exact[text], "exact", 1.0)
        grams = ngrams(full.split(), self.n)
        if not grams:
            return None
        shared: Counter = Counter()
        for gram in grams:
            posting = self.postings.get(gram)
            if posting and len(posting) <= MAX_POSTINGS:
                shared.update(posting)
        best = None
        for other, count in shared.items():
            score = count / max(1, min(len(grams), self.sizes[other]))
            if score >= threshold and (best is None or score > best.score):
                best = Overlap(-1, other, "ngram", score)
        return best


def find_overlaps(
    train: list[dict],
    reference: list[dict],
    n: int = 13,
    threshold: float = 0.5,
    row_texts: Callable[[dict], RowTexts] | None = None,
) -> list[Overlap]:
    """Every training row that overlaps a reference row, with its best match; ``row_texts`` (the
    objective's) names each training row's prompts, which also match on their own."""
    index = Index(reference, n)
    found = []
    for i, row in enumerate(train):
        hit = index.match(row, threshold, prompt_units(row_texts(row)) if row_texts else [])
        if hit is not None:
            hit.train = i
            found.append(hit)
    return found


def _snippet(row: dict, width: int = 70) -> str:
    text = " ".join(" ".join(units(row)).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def check_contamination(
    train: Any,
    references: Iterable[tuple[str, Any]],
    n: int = 13,
    threshold: float = 0.5,
    examples: int = 3,
    row_texts: Callable[[dict], RowTexts] | None = None,
) -> tuple[Finding, set[int]]:
    """Check ``train`` (``Rows``) against each ``(label, Rows)``; returns the finding and the indices of
    overlapping training rows."""
    finding = Finding("contamination")
    flagged: set[int] = set()
    counts = []
    for label, rows in references:
        hits = find_overlaps(train.rows, rows.rows, n, threshold, row_texts)
        if not hits:
            counts.append(f"0 with {label}")
            continue
        flagged |= {h.train for h in hits}
        exact = sum(h.kind == "exact" for h in hits)
        counts.append(f"{len(hits)} with {label}")
        finding.raise_to(
            "warning",
            f"{len(hits)} of {len(train)} training rows overlap {label} ({exact} exact, "
            f"{len(hits) - exact} by {n}-grams), e.g. {train.where[hits[0].train]} ~ "
            f"{rows.where[hits[0].other]}; set guards.contamination.drop=true to drop them",
        )
        for hit in hits[:examples]:
            finding.examples.append(
                f"{train.where[hit.train]} ~ {rows.where[hit.other]} ({hit.kind}"
                f"{'' if hit.kind == 'exact' else f' {hit.score:.2f}'}): {_snippet(train.rows[hit.train])!r}"
            )
        finding.data[label] = {"rows": len(hits), "exact": exact}
    finding.detail = f"{n}-gram and exact: " + ", ".join(counts) if counts else "nothing to compare with"
    finding.data["flagged"] = len(flagged)
    return finding, flagged

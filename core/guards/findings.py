"""What a guard reports: one ``Finding`` per guard, with a status, a short detail line (numbers), the
problems it found (full sentences) and a few examples."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

from lft.errors import LftError

#: Statuses, from quiet to loud.
STATUSES = ("skipped", "ok", "info", "warning", "error")
TITLES = {
    "template": "chat template",
    "lint": "data lint",
    "contamination": "contamination",
    "overfit": "overfitting",
    "repetition": "repetition",
    "forgetting": "forgetting",
    "rank": "LoRA rank",
    "baseline": "prompting baseline",
}


@dataclass
class Finding:
    guard: str
    status: str = "ok"
    detail: str = ""
    problems: list[str] = field(default_factory=list)
    examples: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)

    def raise_to(self, status: str, problem: str | None = None) -> "Finding":
        """Record a problem and raise the status to at least ``status``."""
        if STATUSES.index(status) > STATUSES.index(self.status):
            self.status = status
        if problem:
            self.problems.append(problem)
        return self

    @property
    def fired(self) -> bool:
        return self.status in ("warning", "error")

    def as_dict(self) -> dict:
        return asdict(self)


def skipped(guard: str, why: str) -> Finding:
    return Finding(guard, "skipped", detail=why)


def add_to_summary(summary: dict, findings: Iterable[Finding]) -> None:
    """Append findings to ``summary["guards"]``; their problems go to ``summary["warnings"]``."""
    guards = summary.setdefault("guards", [])
    warnings = summary.setdefault("warnings", [])
    for finding in findings:
        guards.append(finding.as_dict())
        if finding.fired:
            warnings.extend(f"{TITLES.get(finding.guard, finding.guard)}: {p}" for p in finding.problems)


def enforce(findings: Iterable[Finding], strict: bool) -> None:
    """Raise one ``LftError`` naming every error (and, when ``strict``, every warning)."""
    stopping = ("error", "warning") if strict else ("error",)
    problems = [f"{TITLES.get(f.guard, f.guard)}: {p}" for f in findings if f.status in stopping for p in f.problems]
    if problems:
        hint = "" if not strict else " (guards.strict is on: fix these, or turn the guard off in the guards section)"
        raise LftError(" | ".join(problems) + hint)

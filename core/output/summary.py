"""The end of a run: ``summary.json`` in the output folder and a rich table on the console, with the
guards' results below it (the report file is written by ``lft.output.report``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lft.output.files import write_json


def write_summary(output: Path, summary: dict) -> Path:
    target = Path(output) / "summary.json"
    write_json(target, summary)
    return target


def reward_task_warning(summary: dict, history: list[dict], reward: str | None) -> str | None:
    """The sign of reward hacking: the training reward rose while the held-out task metric fell.

    Compares the mean of the step metric ``reward`` (the objective's ``reward_metric``) over the
    first and last quarter of the logged steps with the task accuracy before and after training;
    None when either is missing or nothing is amiss.
    """
    rewards = [h[reward] for h in history if reward and reward in h]
    before = (summary.get("before") or {}).get("task_accuracy")
    after = (summary.get("after") or {}).get("task_accuracy")
    if len(rewards) < 2 or before is None or after is None:
        return None
    quarter = max(1, len(rewards) // 4)
    first, last = sum(rewards[:quarter]) / quarter, sum(rewards[-quarter:]) / quarter
    if last > first and after < before:
        return (
            f"the training reward rose ({first:.3g} -> {last:.3g}) while the held-out task accuracy fell "
            f"({before:.3g} -> {after:.3g}); the policy may be exploiting its reward rather than solving the task"
        )
    return None


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def summary_rows(summary: dict) -> list[tuple[str, str]]:
    """The summary as ``(label, value)`` rows, for the console table and the report file."""
    table = _Rows()
    defaults = summary.get("defaults_used") or []
    objective = summary.get("objective", "")
    wrapper = summary.get("wrapper", "")
    table.add_row("objective", objective + (" (default)" if f"objective {objective}" in defaults else ""))
    table.add_row("model wrapper", wrapper + (" (default)" if f"wrapper {wrapper}" in defaults else ""))
    if summary.get("extensions"):
        table.add_row("extensions", ", ".join(summary["extensions"]))
    table.add_row("model", fmt(summary.get("model")))
    data = summary.get("data", {})
    table.add_row(
        "data",
        f"{data.get('train_examples')} train / {data.get('eval_examples')} eval examples"
        + (f", {data['truncated']} truncated" if data.get("truncated") else ""),
    )
    trainable, total = summary.get("trainable_params"), summary.get("total_params")
    if trainable is not None and total:
        table.add_row("trainable parameters", f"{trainable:,} of {total:,} ({100 * trainable / total:.2f}%)")
    table.add_row("steps", fmt(summary.get("steps")))
    table.add_row("train loss", f"{fmt(summary.get('first_loss'))} -> {fmt(summary.get('last_loss'))}")
    before, after = summary.get("before") or {}, summary.get("after") or {}
    objective = summary.get("objective", "")
    for key in [f"eval_{name}" for name in summary.get("summary_metrics") or ["loss"]] + ["task_accuracy"]:
        if (
            key in before or key in after
        ):  # the objective's own held-out metrics and the task: the rest is in summary.json
            label = (
                f"{objective} {key.removeprefix('eval_').replace('_', ' ')} (held out)"
                if key.startswith("eval_")
                else key.replace("_", " ")
            )
            table.add_row(label, f"{fmt(before.get(key))} -> {fmt(after.get(key))}")
    for name, baseline in (summary.get("baselines") or {}).items():
        how = "a system prompt" if name == "system_prompt" else f"{baseline.get('shots')} examples in the prompt"
        table.add_row(f"task accuracy, base with {how}", fmt(baseline.get("task_accuracy")))
    table.add_row("tokens/s", fmt(summary.get("tokens_per_s")))
    guard_time = (
        f"; guards measured the model for {fmt(summary['guards_measure_time_s'])} s of it"
        if summary.get("guards_measure_time_s")
        else ""
    )
    table.add_row(
        "train time", f"{fmt(summary.get('train_time_s'))} s (total {fmt(summary.get('total_time_s'))} s{guard_time})"
    )
    table.add_row("saved", fmt(summary.get("final")))
    for key, value in (summary.get("notes") or {}).items():
        table.add_row(key.replace("_", " "), fmt(value))
    return table.rows


class _Rows:
    def __init__(self) -> None:
        self.rows: list[tuple[str, str]] = []

    def add_row(self, label: str, value: str) -> None:
        self.rows.append((label, value))


STATUS_STYLE = {"ok": "green", "info": "cyan", "warning": "yellow", "error": "bold red", "skipped": "dim"}


def print_summary(console: Any, summary: dict) -> None:
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="lft run summary", show_header=True, header_style="bold")
    table.add_column("")
    table.add_column("value", overflow="fold")
    for label, value in summary_rows(summary):
        table.add_row(label, escape(value))
    for warning in summary.get("warnings", []):
        table.add_row("[yellow]warning[/]", escape(warning))
    console.print(table)
    print_guards(console, summary.get("guards") or [])
    if summary.get("report"):
        console.print(f"report: {', '.join(summary['report'])}")


def print_guards(console: Any, guards: list[dict], title: str = "guards") -> None:
    """One line per guard: its status and the numbers behind it (the problems are the warnings)."""
    from rich.markup import escape
    from rich.table import Table

    from lft.guards.findings import TITLES

    if not guards:
        return
    fired = sum(g["status"] in ("warning", "error") for g in guards)
    table = Table(title=f"{title}: {fired} fired" if fired else f"{title}: all quiet", header_style="bold")
    for column in ("guard", "result", "detail"):
        table.add_column(column, overflow="fold")
    for g in guards:
        style = STATUS_STYLE.get(g["status"], "")
        table.add_row(TITLES.get(g["guard"], g["guard"]), f"[{style}]{g['status']}[/]", escape(g.get("detail") or ""))
    console.print(table)

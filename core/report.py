"""The end of a run: ``summary.json`` in the output folder and a rich table on the console."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically: a temporary file in the same folder, then a rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def write_summary(output: Path, summary: dict) -> Path:
    target = Path(output) / "summary.json"
    write_json(target, summary)
    return target


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def print_summary(console: Any, summary: dict) -> None:
    from rich.table import Table

    table = Table(title="lft run summary", show_header=True, header_style="bold")
    table.add_column("")
    table.add_column("value", overflow="fold")
    defaults = summary.get("defaults_used") or []
    objective = summary.get("objective", "")
    wrapper = summary.get("wrapper", "")
    table.add_row("objective", objective + (" (default)" if f"objective {objective}" in defaults else ""))
    table.add_row("model wrapper", wrapper + (" (default)" if f"wrapper {wrapper}" in defaults else ""))
    if summary.get("extensions"):
        table.add_row("extensions", ", ".join(summary["extensions"]))
    table.add_row("model", _fmt(summary.get("model")))
    data = summary.get("data", {})
    table.add_row("data", f"{data.get('train_examples')} train / {data.get('eval_examples')} eval examples"
                  + (f", {data['truncated']} truncated" if data.get("truncated") else ""))
    trainable, total = summary.get("trainable_params"), summary.get("total_params")
    if trainable is not None and total:
        table.add_row("trainable parameters", f"{trainable:,} of {total:,} ({100 * trainable / total:.2f}%)")
    table.add_row("steps", _fmt(summary.get("steps")))
    table.add_row("train loss", f"{_fmt(summary.get('first_loss'))} -> {_fmt(summary.get('last_loss'))}")
    before, after = summary.get("before") or {}, summary.get("after") or {}
    for key in sorted(set(before) | set(after)):
        if key.endswith("samples"):
            continue
        table.add_row(key.replace("_", " "), f"{_fmt(before.get(key))} -> {_fmt(after.get(key))}")
    table.add_row("tokens/s", _fmt(summary.get("tokens_per_s")))
    table.add_row("train time", f"{_fmt(summary.get('train_time_s'))} s (total {_fmt(summary.get('total_time_s'))} s)")
    table.add_row("saved", _fmt(summary.get("final")))
    for key, value in (summary.get("notes") or {}).items():
        table.add_row(key.replace("_", " "), _fmt(value))
    for warning in summary.get("warnings", []):
        table.add_row("[yellow]warning[/]", warning)
    console.print(table)

"""The run report: one file in the output folder that says what the run did and what the guards found.

``report.html`` is self-contained (plots are inline SVG); ``report.md`` shows the same content, its
plots written beside it in ``report/``. The plots are small line charts drawn here as SVG: the train
and eval loss, and the metrics the objective names in its ``progress_metrics``. Every file is
written atomically.
"""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any, Sequence

from lft.guards.findings import TITLES
from lft.output.files import atomic_write_text
from lft.output.summary import fmt, summary_rows

COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")
WIDTH, HEIGHT, PAD = 520, 200, 50


def _fmt(value: float) -> str:
    return f"{value:.3g}"


def spans_decades(series: list[tuple[str, list[tuple[float, float]]]]) -> bool:
    """Whether every value is positive and the largest is more than 10 times the smallest: a
    linear axis then flattens everything after the first steps."""
    ys = [y for _, pts in series for _, y in pts]
    return bool(ys) and min(ys) > 0 and max(ys) > 10 * min(ys)


def svg_chart(
    series: list[tuple[str, list[tuple[float, float]]]], title: str, x_label: str = "step", log: bool = False
) -> str:
    """A small line chart: each series is ``(name, [(x, y), ...])``; single points are drawn as
    dots. ``log`` draws the y axis on a log scale (the labels stay the values)."""
    if log:
        series = [(name, [(x, math.log10(y)) for x, y in pts]) for name, pts in series]
        title = f"{title} (log scale)"
    label = (lambda v: _fmt(10**v)) if log else _fmt
    points = [p for _, pts in series for p in pts]
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    if y1 == y0:
        y0, y1 = y0 - abs(y0) * 0.1 - 1e-3, y1 + abs(y1) * 0.1 + 1e-3
    span = y1 - y0
    bottom_value = y0 - 0.05 * span
    y0, y1 = (bottom_value if log or bottom_value >= 0 or y0 < 0 else 0.0), y1 + 0.05 * span
    left, right, top, bottom = PAD + 8, WIDTH - 12, 26, HEIGHT - 28

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * (right - left)

    def py(y: float) -> float:
        return bottom - (y - y0) / (y1 - y0) * (bottom - top)

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}" '
        f'font-family="sans-serif" font-size="11">',
        f'<text x="{left}" y="16" font-weight="bold">{html.escape(title)}</text>',
        f'<rect x="{left}" y="{top}" width="{right - left}" height="{bottom - top}" fill="none" stroke="#bbb"/>',
    ]
    for frac in (0.0, 0.5, 1.0):
        value = y0 + frac * (y1 - y0)
        y = py(value)
        out.append(f'<line x1="{left}" y1="{y:.1f}" x2="{right}" y2="{y:.1f}" stroke="#eee"/>')
        out.append(f'<text x="{left - 4}" y="{y + 4:.1f}" text-anchor="end">{label(value)}</text>')
    for value, anchor in ((x0, "start"), (x1, "end")):
        out.append(f'<text x="{px(value):.1f}" y="{bottom + 14}" text-anchor="{anchor}">{_fmt(value)}</text>')
    out.append(
        f'<text x="{(left + right) / 2:.0f}" y="{bottom + 14}" text-anchor="middle" fill="#666">{x_label}</text>'
    )
    for i, (name, pts) in enumerate(series):
        colour = COLOURS[i % len(COLOURS)]
        coords = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
        if len(pts) > 1:
            out.append(f'<polyline points="{coords}" fill="none" stroke="{colour}" stroke-width="1.5"/>')
        if len(pts) <= 30:
            out += [f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.5" fill="{colour}"/>' for x, y in pts]
        out.append(
            f'<text x="{right - 4}" y="{top + 14 + 13 * i}" text-anchor="end" fill="{colour}">'
            f"{html.escape(name)}</text>"
        )
    out.append("</svg>")
    return "\n".join(out)


def charts(
    history: list[dict], eval_before: float | None = None, families: Sequence[str] = ()
) -> list[tuple[str, str]]:
    """``(name, svg)`` of every chart the history supports: the losses, then one chart per name in
    ``families`` (the objective's ``progress_metrics``) with every metric whose name has a part
    that starts with it; ``eval_before`` is the eval loss at step 0."""

    def series(key: str) -> list[tuple[float, float]]:
        return [(h["step"], float(h[key])) for h in history if isinstance(h.get(key), (int, float)) and "step" in h]

    out = []
    evals = ([(0, float(eval_before))] if eval_before is not None else []) + series("eval_loss")
    loss = [(name, pts) for name, pts in (("train loss", series("loss")), ("eval loss", evals)) if pts]
    if loss:
        out.append(("loss", svg_chart(loss, "loss", log=spans_decades(loss))))
    keys = sorted({k for h in history for k in h if isinstance(h.get(k), (int, float))})
    for family in families:
        members = [k for k in keys if any(part.startswith(family) for part in k.replace("/", "_").split("_"))]
        found = [(k, series(k)) for k in members if series(k)]
        if found:
            out.append((family, svg_chart(found, family)))
    return out


def build(summary: dict, history: list[dict]) -> list[tuple]:
    """The report as blocks: ``("h", text)``, ``("p", text)``, ``("table", headers, rows)``,
    ``("list", items)``, ``("chart", name, svg)``."""
    blocks: list[tuple] = [("title", f"lft run report: {summary.get('output', '')}")]
    guards = summary.get("guards") or []
    fired = [g for g in guards if g["status"] in ("warning", "error")]
    blocks.append(
        ("p", f"{len(fired)} of {len(guards)} guards fired." if fired else f"No guard fired ({len(guards)} checked).")
    )
    blocks += [("h", "Summary"), ("table", ["", "value"], summary_rows(summary))]
    before, after = summary.get("before") or {}, summary.get("after") or {}
    measured = [k for k in sorted(set(before) | set(after)) if not k.endswith("samples")]
    if measured:
        blocks += [
            ("h", "Every held-out measurement"),
            ("table", ["", "before", "after"], [(k, fmt(before.get(k)), fmt(after.get(k))) for k in measured]),
        ]
    if guards:
        blocks += [
            ("h", "Guards"),
            (
                "table",
                ["guard", "result", "detail"],
                [(TITLES.get(g["guard"], g["guard"]), g["status"], g.get("detail") or "") for g in guards],
            ),
        ]
        for g in guards:
            if g["problems"] or g["examples"]:
                blocks.append(("h3", TITLES.get(g["guard"], g["guard"])))
                blocks.append(("list", list(g["problems"]) + [f"example: {e}" for e in g["examples"]]))
    repetition: dict[str, Any] = next((g["data"] for g in guards if g["guard"] == "repetition" and g.get("data")), {})
    if repetition.get("answers"):
        answers, base = repetition["answers"], list(repetition.get("base_answers") or [])
        base += [""] * (len(answers) - len(base))
        rows: list[tuple[str, ...]] = [(" ".join(b.split()), " ".join(a.split())) for a, b in zip(answers, base)]
        blocks += [("h", "Sampled answers to held-out prompts"), ("table", ["base model", "tuned model"], rows)]
    behaviour = next((g["data"].get("everyday") for g in guards if g["guard"] == "forgetting" and g.get("data")), None)
    if behaviour and behaviour.get("worst"):
        rows = [
            (r["prompt"], " ".join(r["base"].split()), " ".join(r["tuned"].split()), ", ".join(r["tuned_signals"]))
            for r in behaviour["worst"]
        ]
        blocks += [
            ("h", "Everyday prompts where the tuned model degenerated"),
            ("table", ["prompt", "base model", "tuned model", "signs"], rows),
        ]
    plots = charts(history, (summary.get("before") or {}).get("eval_loss"), summary.get("progress_metrics") or ())
    if plots:
        blocks.append(("h", "Curves"))
        blocks += [("chart", name, svg) for name, svg in plots]
    return blocks


def to_html(blocks: list[tuple]) -> str:
    e = html.escape
    body = []
    for block in blocks:
        kind = block[0]
        if kind == "title":
            body.append(f"<h1>{e(block[1])}</h1>")
        elif kind in ("h", "h3"):
            body.append(f"<{'h2' if kind == 'h' else 'h3'}>{e(block[1])}</{'h2' if kind == 'h' else 'h3'}>")
        elif kind == "p":
            body.append(f"<p>{e(block[1])}</p>")
        elif kind == "list":
            body.append("<ul>" + "".join(f"<li>{e(item)}</li>" for item in block[1]) + "</ul>")
        elif kind == "table":
            head = "".join(f"<th>{e(h)}</th>" for h in block[1])
            rows = "".join(
                "<tr>" + "".join(f"<td{_status_class(c)}>{e(str(c))}</td>" for c in row) + "</tr>" for row in block[2]
            )
            body.append(f"<table><tr>{head}</tr>{rows}</table>")
        elif kind == "chart":
            body.append(f'<div class="chart">{block[2]}</div>')
    style = (
        "body{font-family:sans-serif;max-width:900px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left;"
        "vertical-align:top}.warning{color:#b58900;font-weight:bold}.error{color:#c00;font-weight:bold}"
        ".ok{color:#2a2}.skipped{color:#999}.chart{display:inline-block;margin:4px}"
    )
    return (
        f'<!doctype html>\n<html><head><meta charset="utf-8"><title>lft run report</title>'
        f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def _status_class(value: Any) -> str:
    return f' class="{value}"' if value in ("ok", "info", "warning", "error", "skipped") else ""


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def to_markdown(blocks: list[tuple], chart_folder: str) -> str:
    lines: list[str] = []
    for block in blocks:
        kind = block[0]
        if kind == "title":
            lines += [f"# {block[1]}", ""]
        elif kind in ("h", "h3"):
            lines += [f"{'##' if kind == 'h' else '###'} {block[1]}", ""]
        elif kind == "p":
            lines += [block[1], ""]
        elif kind == "list":
            lines += [f"- {_cell(item)}" for item in block[1]] + [""]
        elif kind == "table":
            lines.append("| " + " | ".join(_cell(h) for h in block[1]) + " |")
            lines.append("|" + "---|" * len(block[1]))
            lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in block[2]]
            lines.append("")
        elif kind == "chart":
            lines += [f"![{block[1]}]({chart_folder}/{block[1]}.svg)", ""]
    return "\n".join(lines)


def write_report(output: Path, summary: dict, history: list[dict], config: Any) -> list[Path]:
    """Write the report file(s) chosen by ``guards.report``; returns their paths."""
    form = config.section("guards").report
    output = Path(output)
    blocks = build(summary, history)
    written = []
    if form in ("html", "both"):
        atomic_write_text(output / "report.html", to_html(blocks), "report")
        written.append(output / "report.html")
    if form in ("markdown", "both"):
        folder = output / "report"
        folder.mkdir(exist_ok=True)
        for block in blocks:
            if block[0] == "chart":
                atomic_write_text(folder / f"{block[1]}.svg", block[2] + "\n", "plot")
        atomic_write_text(output / "report.md", to_markdown(blocks, folder.name), "report")
        written.append(output / "report.md")
    return written

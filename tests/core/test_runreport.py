"""The run report: small SVG charts, Markdown and HTML from the same content, written atomically."""

import lft
from lft.output.report import build, charts, svg_chart, to_markdown, write_report

HISTORY = [
    {"step": s, "loss": 2.0 / s, "lr": 1e-3, "reward_mean": 0.1 * s, "kl": 0.01 * s, "rewards/chosen": s}
    for s in range(1, 6)
]
HISTORY[2]["eval_loss"] = 1.2
HISTORY[4]["eval_loss"] = 1.1
SUMMARY = {
    "output": "runs/x",
    "objective": "dpo",
    "progress_metrics": ["reward", "kl", "margin", "accuracy"],
    "wrapper": "lora",
    "steps": 5,
    "warnings": ["overfitting: rose"],
    "guards": [
        {
            "guard": "overfit",
            "status": "warning",
            "detail": "eval 1.2 -> 1.1",
            "problems": ["rose"],
            "examples": [],
            "data": {},
        },
        {"guard": "lint", "status": "ok", "detail": "5 rows", "problems": [], "examples": [], "data": {}},
    ],
}


def test_svg_chart_scales_points_into_the_plot_area():
    svg = svg_chart([("a", [(0, 0.0), (10, 1.0)]), ("b", [(5, 0.5)])], "title <x>")
    assert svg.startswith("<svg") and svg.endswith("</svg>") and "title &lt;x&gt;" in svg
    # x 0..10 spans the plot (58..508); y 0..1 is padded by 5% above but not below 0, inside 26..172:
    # y=0 -> 172, y=1 -> 172 - 1/1.05*146 = 33.0
    assert '<polyline points="58.0,172.0 508.0,33.0"' in svg
    negative = svg_chart([("a", [(0, -1.0), (10, 1.0)])], "t")  # padded 5% each side: -1.1..1.1
    assert '<polyline points="58.0,165.4 508.0,32.6"' in negative
    assert svg.count("<circle") == 3


def test_a_loss_spanning_more_than_a_factor_of_ten_is_drawn_on_a_log_scale():
    # loss 100 -> 1: log10 2 -> 0, padded 5% each side (-0.1..2.1) inside 26..172; so 100 is at
    # 172 - 2.1/2.2*146 = 32.6 and 1 at 172 - 0.1/2.2*146 = 165.4, and the middle label is 10^1 = 10.
    steep = [{"step": 0, "loss": 100.0}, {"step": 10, "loss": 1.0}]
    svg = dict(charts(steep))["loss"]
    assert "loss (log scale)" in svg and '<polyline points="58.0,32.6 508.0,165.4"' in svg
    assert ">10</text>" in svg
    gentle = dict(charts([{"step": 0, "loss": 9.0}, {"step": 10, "loss": 1.0}]))["loss"]
    assert "log scale" not in gentle  # within a factor of 10: linear


def test_charts_for_loss_and_every_reward_kl_metric():
    names = [name for name, _ in charts(HISTORY, families=("reward", "kl", "margin", "accuracy"))]
    assert names == ["loss", "reward", "kl"]
    loss_svg = dict(charts(HISTORY, families=("reward", "kl", "margin", "accuracy")))["loss"]
    assert "train loss" in loss_svg and "eval loss" in loss_svg
    reward_svg = dict(charts(HISTORY, families=("reward", "kl", "margin", "accuracy")))["reward"]
    assert "reward_mean" in reward_svg and "rewards/chosen" in reward_svg
    assert charts([{"step": 1, "lr": 0.1}]) == []
    with_before = dict(charts(HISTORY, eval_before=2.5))["loss"]
    assert with_before.count('fill="#d62728"') == 4  # eval points at steps 0, 3, 5 and the legend


def test_markdown_and_html_reports(tmp_path):
    markdown = to_markdown(build(SUMMARY, HISTORY), "report")
    assert "1 of 2 guards fired." in markdown and "| overfitting | warning | eval 1.2 -> 1.1 |" in markdown
    assert "- rose" in markdown and "![reward](report/reward.svg)" in markdown
    config = lft.load_config(overrides=["guards.report=both"])
    paths = write_report(tmp_path, SUMMARY, HISTORY, config)
    assert [p.name for p in paths] == ["report.html", "report.md"]
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == ["kl.svg", "loss.svg", "reward.svg"]
    html = (tmp_path / "report.html").read_text()
    assert html.count("<svg") == 3 and '<td class="warning">warning</td>' in html
    assert not [p for p in tmp_path.rglob(".*")]  # no temporary file left behind
    assert write_report(tmp_path / "x", SUMMARY, HISTORY, lft.load_config(overrides=["guards.report=none"])) == []

"""Training data from several sources: rows drawn in proportion to the weights, seeded, held-out
rows taken from each source before any row repeats, and the rows drawn reported per source."""

import json

import pytest

import lft
from lft.data.files import Rows, data_flag, interleave, mix


def part(name, n):
    return Rows(name, [{"text": f"{name}{i}"} for i in range(n)], [f"{name}:{i + 1}" for i in range(n)])


def test_rows_are_drawn_in_proportion_to_the_weights():
    a, b = part("a", 10), part("b", 30)
    mixed, counts = mix([a, b], [3.0, 1.0], seed=0)
    # 40 rows in all: a gets 3/4 = 30 (each of its 10 rows three times), b 1/4 = 10 of its 30
    assert counts == [30, 10] and len(mixed) == 40
    texts = [r["text"] for r in mixed.rows]
    assert all(texts.count(f"a{i}") == 3 for i in range(10))
    drawn_b = [t for t in texts if t.startswith("b")]
    assert len(drawn_b) == len(set(drawn_b)) == 10
    assert mixed.where[texts.index("a0")] == "a:1"  # each row keeps where it came from
    again, _ = mix([a, b], [3.0, 1.0], seed=0)
    other, _ = mix([a, b], [3.0, 1.0], seed=1)
    assert again.rows == mixed.rows and other.rows != mixed.rows


def test_held_out_rows_are_taken_in_turn_from_each_source():
    # so that capping the held-out rows at data.max_eval_rows still takes from every source
    assert [r["text"] for r in interleave([part("a", 3), part("b", 1)]).rows] == ["a0", "b0", "a1", "a2"]


def test_the_data_flag_reads_weights():
    assert data_flag(["a.jsonl"]) == "a.jsonl"
    assert data_flag(["a.jsonl:3", "b.jsonl"]) == [{"path": "a.jsonl", "weight": 3.0}, "b.jsonl"]
    assert data_flag(["hub/name:0.5"]) == [{"path": "hub/name", "weight": 0.5}]
    assert data_flag(None) is None


def test_a_run_on_a_mixture_reports_the_rows_drawn_from_each_source(lft_tiny_model, lft_sft_data, tmp_path):
    from lft.cli.main import main
    from lft.plugin.testing import FAST

    rows = [json.loads(x) for x in lft_sft_data["train"].read_text().splitlines()]
    first, second = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    first.write_text("".join(json.dumps(r) + "\n" for r in rows[:40]))
    second.write_text("".join(json.dumps(r) + "\n" for r in rows[40:60]))
    output = tmp_path / "run"
    argv = [
        "run",
        "-q",
        "--model",
        str(lft_tiny_model),
        "--data",
        f"{first}:3",
        "--data",
        str(second),
        "--output",
        str(output),
        "trainer.max_steps=2",
        "data.eval_split=0.1",
        "guards.enabled=false",
        *FAST,
    ]
    assert main(argv) == 0
    summary = json.loads((output / "summary.json").read_text())  # fmt: skip
    sources = summary["data"]["sources"]
    # held out first (10% of each: 4 and 2 rows), then 36 + 18 = 54 rows drawn 3:1
    assert [(s["path"], s["weight"], s["rows"], s["drawn"]) for s in sources] == [
        (str(first), 3.0, 36, 40),
        (str(second), 1.0, 18, 14),
    ]
    assert summary["data"]["train_examples"] == 54 and summary["data"]["eval_examples"] == 6


def test_a_mixture_in_a_config_file_takes_per_source_options(tmp_path, lft_sft_data):
    config = lft.load_config(
        overrides=[
            f"data.train=[{{path: {lft_sft_data['train']}, weight: 2}}, {{path: org/name, split: test, "
            "subset: en, revision: v1.0}]"
        ]
    )
    second = config.data.train[1]
    assert (second.path, second.split, second.subset, second.revision, second.weight) == (
        "org/name",
        "test",
        "en",
        "v1.0",
        1.0,
    )
    with pytest.raises(lft.ConfigError, match="weight"):
        lft.load_config(overrides=[f"data.train=[{{path: {lft_sft_data['train']}, weight: 0}}]"])

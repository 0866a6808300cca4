"""Reading data files and batching: clear errors that name the file and the row."""

import json
import random

import pytest
import torch

from lft.data import files
from lft.data.format import pad_collate
from lft.data.loader import STEP_KEY, ResumableLoader
from lft.errors import DataError


def test_jsonl_reports_the_bad_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b"\n')
    with pytest.raises(DataError, match=r"d.jsonl:3: invalid JSON"):
        files.read_rows(str(path))
    path.write_text('{"text": "a"}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"d.jsonl:2: expected a JSON object per line, got list"):
        files.read_rows(str(path))


def test_rows_keep_their_line_numbers(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b"}\n')
    rows = files.read_rows(str(path))
    assert rows.rows == [{"text": "a"}, {"text": "b"}]
    assert rows.where == [f"{path}:1", f"{path}:3"]


def test_non_utf8_empty_missing_and_unknown_type(tmp_path):
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes('{"text": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8 text"):
        files.read_rows(str(latin))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="no rows; the dataset is empty"):
        files.read_rows(str(empty))
    with pytest.raises(DataError, match="data file .*nope.jsonl not found"):
        files.read_rows(str(tmp_path / "nope.jsonl"))
    odd = tmp_path / "d.txt"
    odd.write_text("x")
    with pytest.raises(DataError, match="unsupported file type .txt"):
        files.read_rows(str(odd))


def test_json_csv_and_parquet(tmp_path):
    rows = [{"prompt": "p1", "completion": "c1"}, {"prompt": "p2", "completion": "c2"}]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    assert files.read_rows(str(tmp_path / "d.json")).rows == rows
    (tmp_path / "d.csv").write_text("prompt,completion\np1,c1\np2,c2\n")
    assert files.read_rows(str(tmp_path / "d.csv")).rows == rows
    import datasets

    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    assert files.read_rows(str(tmp_path / "d.parquet")).rows == rows


def test_split_is_seeded_and_disjoint(tmp_path):
    rows = files.Rows("x", [{"i": i} for i in range(20)], [str(i) for i in range(20)])
    train, held = files.split_rows(rows, 0.25, seed=3)
    again_train, again_held = files.split_rows(rows, 0.25, seed=3)
    assert len(held) == 5 and len(train) == 15 and held.rows == again_held.rows
    assert not {r["i"] for r in train.rows} & {r["i"] for r in held.rows}
    with pytest.raises(DataError, match="too few"):
        files.split_rows(files.Rows("x", [{"i": 0}], ["0"]), 0.5, 0)


def test_pad_collate():
    batch = pad_collate(
        [
            {"input_ids": [1, 2, 3], "labels": [-100, 2, 3], "score": 1.5},
            {"input_ids": [4], "labels": [4], "score": 0.5},
        ],
        pad_id=0,
    )
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [4, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert torch.allclose(batch["score"], torch.tensor([1.5, 0.5], dtype=torch.float64).to(batch["score"].dtype))


def test_resumable_loader_continues_mid_epoch():
    items = list(range(10))
    loader = ResumableLoader(items, batch_size=3, collate_fn=list, seed=1)
    first_epoch = list(loader)
    assert sorted(sum(first_epoch, [])) == items and len(first_epoch) == 4
    fresh = ResumableLoader(items, batch_size=3, collate_fn=list, seed=1)
    iterator = iter(fresh)
    seen = [next(iterator), next(iterator)]
    state = fresh.state_dict()
    resumed = ResumableLoader(items, batch_size=3, collate_fn=list, seed=1)
    resumed.load_state_dict(state)
    assert seen + list(resumed) == first_epoch
    assert list(resumed) != first_epoch  # the next epoch has a new order


def test_loader_shards_by_rank():
    items = list(range(12))
    shards = [list(ResumableLoader(items, 2, list, seed=0, rank=r, world_size=2)) for r in range(2)]
    flat = [sorted(sum(s, [])) for s in shards]
    assert not set(flat[0]) & set(flat[1]) and sorted(flat[0] + flat[1]) == items


def test_length_grouped_batches_cut_padding_and_resume():
    rng = random.Random(0)
    lengths = [rng.randint(5, 200) for _ in range(400)]
    items = list(range(400))

    def padded(batches):
        return sum(max(lengths[i] for i in b) * len(b) for b in batches)

    plain = list(ResumableLoader(items, batch_size=4, collate_fn=list, seed=3))
    grouped = list(ResumableLoader(items, batch_size=4, collate_fn=list, seed=3, lengths=lengths))
    assert sorted(sum(grouped, [])) == items  # every example once per epoch
    assert padded(grouped) < 0.75 * padded(plain)
    assert [len(b) for b in grouped].count(4) == 100
    # deterministic, resumable mid-epoch, and a new order next epoch
    fresh = ResumableLoader(items, batch_size=4, collate_fn=list, seed=3, lengths=lengths)
    iterator = iter(fresh)
    seen = [next(iterator) for _ in range(7)]
    resumed = ResumableLoader(items, batch_size=4, collate_fn=list, seed=3, lengths=lengths)
    resumed.load_state_dict(fresh.state_dict())
    assert seen + list(resumed) == grouped
    assert list(resumed) != grouped


def test_the_loader_counts_each_optimizer_steps_units_before_its_first_batch():
    """7 batches of 2 rows, 3 accumulated per step: steps of 3, 3 and 1 micro-batches, each
    batch tagged with its own count and its step's total (the rows' token counts here)."""
    from lft.objective import Objective

    class Tokens(Objective):
        def units(self, batch):
            return {"tokens": sum(batch["n"])}

    items = [{"n": n} for n in range(1, 15)]
    collate = lambda rows: {"n": [r["n"] for r in rows]}  # noqa: E731
    loader = ResumableLoader(items, 2, collate, seed=0, shuffle=False, accumulate=3, objective=Tokens())
    batches = list(loader)
    steps = [b[STEP_KEY] for b in batches]
    assert [s["size"] for s in steps] == [3, 3, 3, 3, 3, 3, 1]
    assert [s["step"] for s in steps] == [1, 1, 1, 2, 2, 2, 3]
    assert [float(s["units"]["tokens"]) for s in steps] == [sum(b["n"]) for b in batches]
    assert [float(s["totals"]["tokens"]) for s in steps] == [21.0] * 3 + [57.0] * 3 + [27.0]
    resumed = ResumableLoader(items, 2, collate, seed=0, shuffle=False, accumulate=3, objective=Tokens())
    resumed.load_state_dict({"epoch": 0, "consumed": 4})  # killed inside the second step
    rest = list(resumed)
    assert [b["n"] for b in rest] == [b["n"] for b in batches[4:]]
    assert float(rest[0][STEP_KEY]["totals"]["tokens"]) == 57.0  # the whole step is counted

"""Streaming: ``data.streaming=true`` reads the training sources lazily, so memory does not grow
with the data. Rows are read, drawn by weight, formatted and batched as training needs them.

* A JSONL file is read line by line here (so a bad row is still reported with its file and
  line); any other file or hub dataset through the ``datasets`` library's iterable datasets
  (``streaming=True``), its rows numbered as they come.
* The sources are drawn in proportion to their weights, seeded, without end: a source that runs
  out starts again. The run's length is ``trainer.max_steps``.
* With no ``data.eval``, the first rows of each source (``data.max_eval_rows`` in all, shared by
  weight) are held out for evaluation and left out of every pass of the stream.
* The preflight guards see the first ``data.streaming_sample`` training rows, and say so.
* Resume restarts at the row after the last one trained: the loader's state is the number of
  stream rows consumed, and a resumed run reads past them.
* Under DDP every process trains on its own rows of the stream (the k-th of each ``world``).
"""

from __future__ import annotations

import random
from collections import deque
from pathlib import Path
from typing import Any, Iterator

from torch.utils.data import DataLoader, IterableDataset

from lft.data.files import Rows, iter_jsonl
from lft.data.format import FormatStats, format_row
from lft.data.loader import STEP_KEY
from lft.errors import DataError

#: The key under which a streamed batch carries the stream rows read up to its end; the training
#: step takes it off and tells the loader (``mark_trained``), whose state is then the rows of the
#: batches trained, not of any batch Lightning fetched ahead.
STREAM_KEY = "lft_stream_rows"


def iter_source(source: Any, split: str) -> Iterator[tuple[dict, str]]:
    """The rows of one source, lazily, each with where it came from."""
    path = Path(source.path).expanduser()
    suffix = path.suffix.lower()
    if path.is_file() and suffix == ".jsonl":
        yield from iter_jsonl(path)
        return
    import datasets

    datasets.disable_progress_bars()
    try:
        if path.is_file():
            kind = {".json": "json", ".parquet": "parquet", ".csv": "csv"}.get(suffix)
            if kind is None:
                raise DataError(f"{source.path}: unsupported file type {suffix or '(none)'} for streaming")
            table = datasets.load_dataset(kind, data_files=str(path), split="train", streaming=True)
        elif not path.exists() and source.path.count("/") == 1:
            table = datasets.load_dataset(
                source.path, source.subset, split=source.split or split, revision=source.revision, streaming=True
            )
        else:
            raise DataError(f"data file {source.path} not found")
        for number, row in enumerate(table, 1):
            yield dict(row), f"{source.path}: row {number}"
    except DataError:
        raise
    except Exception as exc:  # datasets raises many types; one line, with the root cause
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{source.path}: could not be streamed ({message})") from None


def _rows_after(source: Any, split: str, skip: int) -> Iterator[tuple[dict, str]]:
    for number, item in enumerate(iter_source(source, split)):
        if number >= skip:
            yield item


def stream_rows(
    mixture: list[Any], split: str, seed: int, heads: list[int] | None = None, cycle: bool = True
) -> Iterator[tuple[dict, str]]:
    """The sources' rows drawn by weight, seeded; each source's first ``heads[i]`` rows (the
    held-out ones) left out on every pass. ``cycle``: without end, a source that ends starting
    again; otherwise until every source has ended once."""
    rng = random.Random(seed)
    heads = heads or [0] * len(mixture)
    readers: dict[int, Iterator[tuple[dict, str]]] = {
        i: _rows_after(source, split, heads[i]) for i, source in enumerate(mixture)
    }
    while readers:
        live = sorted(readers)
        index = rng.choices(live, [mixture[i].weight for i in live])[0] if len(live) > 1 else live[0]
        try:
            yield next(readers[index])
            continue
        except StopIteration:
            pass
        if not cycle:
            del readers[index]
            continue
        readers[index] = _rows_after(mixture[index], split, heads[index])
        try:
            yield next(readers[index])
        except StopIteration:
            raise DataError(
                f"{mixture[index].path}: no rows to train on"
                + (f" after the {heads[index]} held out" if heads[index] else "; the dataset is empty")
            ) from None


def held_out(mixture: list[Any], split: str, total: int) -> tuple[Rows, list[int]]:
    """The first rows of each source, ``total`` in all, shared by weight: the held-out rows of a
    streamed run (never trained on: every pass of the stream leaves them out)."""
    weight = sum(s.weight for s in mixture)
    heads = [max(1, round(total * s.weight / weight)) for s in mixture]
    rows: list[dict] = []
    where: list[str] = []
    for source, count in zip(mixture, heads):
        for number, (row, place) in enumerate(iter_source(source, split)):
            if number >= count:
                break
            rows.append(row)
            where.append(place)
    return Rows(" + ".join(s.path for s in mixture), rows, where), heads


def head(mixture: list[Any], split: str, seed: int, heads: list[int], count: int) -> Rows:
    """The first ``count`` training rows of the stream, in one pass (the guards' sample)."""
    rows: list[dict] = []
    where: list[str] = []
    for row, place in stream_rows(mixture, split, seed, heads, cycle=False):
        if len(rows) >= count:
            break
        rows.append(row)
        where.append(place)
    return Rows(" + ".join(s.path for s in mixture), rows, where)


class _Unsized(IterableDataset):
    def __iter__(self) -> Iterator[Any]:
        return iter(())


class StreamLoader(DataLoader):
    """Batches of the stream, formatted as they are read; its state is the rows consumed."""

    def __init__(self, run: dict, hook: Any, tokenizer: Any, config: Any, collate_fn: Any, objective: Any = None,
                 rank: int = 0, world_size: int = 1):  # fmt: skip
        super().__init__(_Unsized(), batch_size=None)
        self.run, self.hook, self.tokenizer, self.config = run, hook, tokenizer, config
        self.collate = collate_fn
        self._objective = objective
        self._rank, self._world = rank, world_size
        self._consumed = 0  # training rows of the stream read so far (every process's)
        self._trained = 0  # the same, up to the end of the last batch a training step took
        self._resume_at = 0
        self._steps = 0
        self._served: deque[tuple[int, list[str]]] = deque(maxlen=64)
        self._serial = 0
        self.stats = FormatStats()

    def _features(self, rows: Iterator[tuple[int, dict, str]], count: int) -> tuple[list[dict], list[str]]:
        features: list[dict] = []
        wheres: list[str] = []
        for number, row, where in rows:
            self._consumed = number + 1
            if number % self._world != self._rank:
                continue
            feature = format_row(row, where, self.hook, self.tokenizer, self.config, self.stats)
            if feature is not None:
                features.append(feature)
                wheres.append(where)
                if len(features) == count:
                    break
        return features, wheres

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        data, trainer = self.config.data, self.config.trainer
        skip, self._resume_at = self._resume_at, 0
        stream = stream_rows(self.run["mixture"], data.split, trainer.seed, self.run["heads"])
        numbered = ((n, row, where) for n, (row, where) in enumerate(stream) if n >= skip)
        self._consumed = self._trained = skip
        accumulate = 1 if self._objective is None else max(1, trainer.grad_accum)
        while True:
            step, ends = [], []
            for _ in range(accumulate):
                step.append(self._features(numbered, trainer.batch_size))
                ends.append(self._consumed)
            batches = [self.collate(features) for features, _ in step]
            if self._objective is not None:
                from lft.objective import add_units, units_of

                counts = [units_of(self._objective, batch) for batch in batches]
                totals = add_units(counts)
                self._steps += 1
                for batch, units in zip(batches, counts):
                    batch[STEP_KEY] = {"step": self._steps, "units": units, "totals": totals, "size": len(batches)}
            for batch, (_, wheres), end in zip(batches, step, ends):
                batch[STREAM_KEY] = end
                self._served.append((self._serial, wheres))
                self._serial += 1
                yield batch

    def rows_of(self, serial: int) -> list[str] | None:
        return next((wheres for number, wheres in self._served if number == serial), None)

    def mark_trained(self, rows: int) -> None:
        self._trained = rows

    def state_dict(self) -> dict:
        return {"rows": self._trained}

    def load_state_dict(self, state: dict) -> None:
        self._resume_at = int(state.get("rows", 0))

"""Reading data files: JSONL, JSON, Parquet, CSV and hub datasets, as rows that remember where
each came from. A bad file or row is reported as one line that names the file and the row (the
line number for JSONL) and says what was expected.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from lft.errors import DataError

SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
#: The key under which a training batch carries the unit counts of its optimizer step (taken off


@dataclass
class Rows:
    """Rows of one data source, with a label for each row to use in error messages."""

    source: str
    rows: list[dict]
    where: list[str]

    def __len__(self) -> int:
        return len(self.rows)

    def subset(self, indices: list[int]) -> "Rows":
        return Rows(self.source, [self.rows[i] for i in indices], [self.where[i] for i in indices])


def _check_surrogates(row: dict, where: str) -> None:
    """JSON escapes can spell half of a UTF-16 pair (\\ud800), which is no character at all."""
    try:
        json.dumps(row, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = exc.object[exc.start : exc.end].encode("unicode_escape").decode()
        raise DataError(f"{where}: contains an unpaired surrogate escape ({bad}), which is not text") from None


def iter_jsonl(path: Path) -> Iterator[tuple[dict, str]]:
    """The rows of a JSONL file, one at a time, each with its ``file:line``."""
    with path.open("rb") as handle:
        for lineno, raw in enumerate(handle, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(
                    f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at column "
                    f"{exc.start + 1}); re-encode the file as UTF-8"
                ) from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object per line, got {type(row).__name__}")
            if "\\u" in line.lower():
                _check_surrogates(row, f"{path}:{lineno}")
            yield row, f"{path}:{lineno}"


def _read_jsonl(path: Path) -> Rows:
    rows, where = [], []
    for row, place in iter_jsonl(path):
        rows.append(row)
        where.append(place)
    return Rows(str(path), rows, where)


def _read_json(path: Path) -> Rows:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (invalid byte at offset {exc.start}); re-encode it as UTF-8") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f'{path}: expected a JSON list of objects (or {{"data": [...]}})')
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise DataError(f"{path}: row {i + 1}: expected an object, got {type(row).__name__}")
    return Rows(str(path), data, [f"{path}: row {i + 1}" for i in range(len(data))])


def _read_with_datasets(
    spec: str, kind: str | None, split: str, subset: str | None = None, revision: str | None = None
) -> Rows:
    import logging

    import datasets

    datasets.logging.set_verbosity(logging.CRITICAL)  # its error lines would repeat ours
    datasets.disable_progress_bars()
    try:
        if kind is not None:
            table = datasets.load_dataset(kind, data_files=spec, split="train")
        else:
            table = datasets.load_dataset(spec, subset, split=split, revision=revision)
    except Exception as exc:  # datasets raises many types; the user needs the root cause, in one line
        chain: list[BaseException] = [exc]
        while len(chain) < 10 and (chain[-1].__cause__ or chain[-1].__context__) is not None:
            chain.append(chain[-1].__cause__ or chain[-1].__context__)  # type: ignore[arg-type]
        for cause in chain:
            if isinstance(cause, UnicodeDecodeError):
                raise DataError(
                    f"{spec}: not UTF-8 text (invalid byte at offset {cause.start}); re-encode it as UTF-8"
                ) from None
            if type(cause).__name__ == "EmptyDataError":
                raise DataError(f"{spec}: no rows; the dataset is empty") from None
        root = next((c for c in chain if not type(c).__module__.startswith("datasets")), exc)
        message = str(root).strip().splitlines()[0] if str(root).strip() else type(root).__name__
        raise DataError(f"{spec}: could not be read ({message})") from None
    rows = table.to_list()
    return Rows(spec, rows, [f"{spec}: row {i + 1}" for i in range(len(rows))])


def read_rows(spec: str, split: str = "train", subset: str | None = None, revision: str | None = None) -> Rows:
    """Read a data file (.jsonl, .json, .parquet, .csv) or a hub dataset id (with its split,
    subset and revision)."""
    path = Path(spec).expanduser()
    suffix = path.suffix.lower()
    if path.is_dir():
        raise DataError(f"{spec} is a folder; give a data file ({', '.join(SUFFIXES)}) or a hub dataset id")
    if not path.exists():
        looks_local = suffix in SUFFIXES or spec.startswith((".", "/", "~")) or spec.count("/") != 1
        if looks_local:
            raise DataError(f"data file {spec} not found")
        rows = _read_with_datasets(spec, None, split, subset, revision)
    elif suffix == ".jsonl":
        rows = _read_jsonl(path)
    elif suffix == ".json":
        rows = _read_json(path)
    elif suffix in (".parquet", ".csv"):
        rows = _read_with_datasets(str(path), suffix[1:], split)
    else:
        raise DataError(f"{spec}: unsupported file type {suffix or '(none)'}; expected one of {', '.join(SUFFIXES)}")
    if not rows.rows:
        raise DataError(f"{spec}: no rows; the dataset is empty")
    return rows


def split_rows(rows: Rows, fraction: float, seed: int) -> tuple[Rows, Rows]:
    """Carve a held-out split off ``rows`` (at least one row each side)."""
    n = len(rows)
    n_eval = max(1, int(round(n * fraction)))
    if n - n_eval < 1:
        raise DataError(
            f"{rows.source}: {n} row(s) are too few to hold some out for evaluation; "
            "give data.eval or set data.eval_split=0"
        )
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return rows.subset(sorted(order[n_eval:])), rows.subset(sorted(order[:n_eval]))


# -- mixtures of several sources ---------------------------------------------------------------


def sources(train: Any) -> list[Any]:
    """``data.train`` as a list of ``DataSource`` (one for a plain path)."""
    from lft.config import DataSource

    items = train if isinstance(train, list) else [train]
    return [DataSource.model_validate({"path": item}) if isinstance(item, str) else item for item in items]


def data_flag(values: list[str] | None) -> Any:
    """``--data`` given once or more (``PATH`` or ``PATH:WEIGHT``) as ``data.train``'s value."""
    if not values:
        return None
    items: list[Any] = []
    for value in values:
        path, sep, weight = value.rpartition(":")
        try:
            share = float(weight) if sep and path and not Path(value).exists() else None
        except ValueError:
            share = None
        items.append({"path": path, "weight": share} if share is not None else value)
    return items[0] if len(items) == 1 and isinstance(items[0], str) else items


def train_label(config: Any) -> str:
    return " + ".join(source.path for source in sources(config.data.train))


def read_train(config: Any) -> Rows:
    """Every row of the training sources, one source or the mixture of several (a run takes its
    held-out rows from each source first; this is what ``lft check`` and ``lft inspect`` read)."""
    mixture = sources(config.data.train)
    parts = [read_source(source, config.data.split) for source in mixture]
    if len(parts) == 1:
        return parts[0]
    return mix(parts, [source.weight for source in mixture], config.trainer.seed)[0]


def read_source(source: Any, split: str) -> Rows:
    return read_rows(source.path, source.split or split, source.subset, source.revision)


def interleave(parts: list[Rows]) -> Rows:
    """The rows of ``parts`` taken in turn, one from each (a part that ends drops out)."""
    rows, where = [], []
    for i in range(max((len(p) for p in parts), default=0)):
        for part in parts:
            if i < len(part):
                rows.append(part.rows[i])
                where.append(part.where[i])
    return Rows(" + ".join(p.source for p in parts), rows, where)


def mix(parts: list[Rows], weights: list[float], seed: int) -> tuple[Rows, list[int]]:
    """One set of rows drawn from ``parts`` in proportion to ``weights``, and how many rows each
    gave. The mixture has as many rows as the parts together; a part whose share is more than its
    rows repeats them (each pass in a new seeded order), one whose share is less gives a seeded
    sample. The order of the mixture is shuffled with ``seed``: the same seed, the same mixture."""
    total, weight = sum(len(p) for p in parts), sum(weights)
    counts = [round(total * w / weight) for w in weights]
    counts = [max(1, c) for c in counts]
    rng = random.Random(seed)
    picked: list[tuple[int, int]] = []
    for index, (part, count) in enumerate(zip(parts, counts)):
        order: list[int] = []
        while len(order) < count:
            lap = list(range(len(part)))
            rng.shuffle(lap)
            order += lap
        picked += [(index, row) for row in order[:count]]
    rng.shuffle(picked)
    rows = [parts[i].rows[r] for i, r in picked]
    where = [parts[i].where[r] for i, r in picked]
    return Rows(" + ".join(p.source for p in parts), rows, where), counts

"""Reading data files, formatting rows through the hooks, and the Lightning DataModule.

A bad file or row is reported as one line that names the file and the row (the line number for
JSONL) and says what was expected.
"""

from __future__ import annotations

import json
import math
import random
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import lightning as L
import torch
from torch.utils.data import DataLoader

from lft.errors import DataError
from lft.losses.logprobs import IGNORE_INDEX

SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
#: The key under which a training batch carries the unit counts of its optimizer step (taken off
#: the batch by the module before the objective sees it).
STEP_KEY = "lft_step"


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
        bad = exc.object[exc.start:exc.end].encode("unicode_escape").decode()
        raise DataError(f"{where}: contains an unpaired surrogate escape ({bad}), which is not text") from None


def _read_jsonl(path: Path) -> Rows:
    rows, where = [], []
    with path.open("rb") as handle:
        for lineno, raw in enumerate(handle, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at column "
                                f"{exc.start + 1}); re-encode the file as UTF-8") from None
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
            rows.append(row)
            where.append(f"{path}:{lineno}")
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
        raise DataError(f"{path}: expected a JSON list of objects (or {{\"data\": [...]}})")
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise DataError(f"{path}: row {i + 1}: expected an object, got {type(row).__name__}")
    return Rows(str(path), data, [f"{path}: row {i + 1}" for i in range(len(data))])


def _read_with_datasets(spec: str, kind: str | None, split: str) -> Rows:
    import logging

    import datasets

    datasets.logging.set_verbosity(logging.CRITICAL)  # its error lines would repeat ours
    datasets.disable_progress_bars()
    try:
        if kind is not None:
            table = datasets.load_dataset(kind, data_files=spec, split="train")
        else:
            table = datasets.load_dataset(spec, split=split)
    except Exception as exc:  # datasets raises many types; the user needs the root cause, in one line
        chain: list[BaseException] = [exc]
        while len(chain) < 10 and (chain[-1].__cause__ or chain[-1].__context__) is not None:
            chain.append(chain[-1].__cause__ or chain[-1].__context__)  # type: ignore[arg-type]
        for cause in chain:
            if isinstance(cause, UnicodeDecodeError):
                raise DataError(f"{spec}: not UTF-8 text (invalid byte at offset {cause.start}); "
                                "re-encode it as UTF-8") from None
            if type(cause).__name__ == "EmptyDataError":
                raise DataError(f"{spec}: no rows; the dataset is empty") from None
        root = next((c for c in chain if not type(c).__module__.startswith("datasets")), exc)
        message = str(root).strip().splitlines()[0] if str(root).strip() else type(root).__name__
        raise DataError(f"{spec}: could not be read ({message})") from None
    rows = table.to_list()
    return Rows(spec, rows, [f"{spec}: row {i + 1}" for i in range(len(rows))])


def read_rows(spec: str, split: str = "train") -> Rows:
    """Read a data file (.jsonl, .json, .parquet, .csv) or a hub dataset id."""
    path = Path(spec).expanduser()
    suffix = path.suffix.lower()
    if path.is_dir():
        raise DataError(f"{spec} is a folder; give a data file ({', '.join(SUFFIXES)}) or a hub dataset id")
    if not path.exists():
        looks_local = suffix in SUFFIXES or spec.startswith((".", "/", "~")) or spec.count("/") != 1
        if looks_local:
            raise DataError(f"data file {spec} not found")
        rows = _read_with_datasets(spec, None, split)
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
        raise DataError(f"{rows.source}: {n} row(s) are too few to hold some out for evaluation; "
                        "give data.eval or set data.eval_split=0")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return rows.subset(sorted(order[n_eval:])), rows.subset(sorted(order[:n_eval]))


@dataclass
class FormatStats:
    rows: int = 0
    examples: int = 0
    truncated: int = 0
    dropped: int = 0
    skipped: int = 0
    longest: int = 0
    trained_tokens: int = 0
    tokens: int = 0
    notes: list[str] = field(default_factory=list)


class Examples(list):
    """Formatted examples (a plain list) that remember where each came from (``where``), so a
    fault during training can name the rows of the batch."""

    def __init__(self, features: list[dict], where: list[str]):
        super().__init__(features)
        self.where = list(where)


def _length(feature: dict) -> int:
    lengths = [len(v) for k, v in feature.items() if k.endswith("input_ids") and isinstance(v, (list, tuple))]
    return max(lengths) if lengths else 0


def _trained(feature: dict) -> int:
    return sum(sum(1 for t in v if t != IGNORE_INDEX) for k, v in feature.items() if k.endswith("labels") and isinstance(v, list))


def format_rows(rows: Rows, hook: Any, tokenizer: Any, config: Any) -> tuple[list[dict], FormatStats]:
    """Run ``lft_format_example`` on every row. Rows the hook returns ``{"skip": reason}`` for
    are left out and counted; DataErrors get the row's location added."""
    stats = FormatStats(rows=len(rows))
    features, kept = [], []
    policy = config.data.truncation
    for row, where in zip(rows.rows, rows.where):
        try:
            feature = hook.lft_format_example(example=row, tokenizer=tokenizer, config=config)
        except DataError as exc:
            raise DataError(f"{where}: {exc}") from None
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"{where}: cannot format this row ({type(exc).__name__}: {exc})") from None
        if feature is None:
            raise DataError(f"{where}: no selected plugin can format this row (columns: {', '.join(row)})")
        if "skip" in feature:
            stats.skipped += 1
            if len(stats.notes) < 3:
                stats.notes.append(f"{where}: skipped ({feature['skip']})")
            continue
        length = _length(feature)
        if feature.pop("truncated", False) or length > config.data.max_length:
            if policy == "error":
                raise DataError(f"{where}: example is longer than data.max_length={config.data.max_length} tokens")
            if policy == "drop":
                stats.dropped += 1
                continue
            stats.truncated += 1
        trained = _trained(feature)
        if trained == 0 and any(k.endswith("labels") for k in feature):
            stats.skipped += 1
            if len(stats.notes) < 3:
                stats.notes.append(f"{where}: skipped (no trained tokens left after truncation)")
            continue
        stats.longest = max(stats.longest, length)
        stats.tokens += length
        stats.trained_tokens += trained
        features.append(feature)
        kept.append(where)
    stats.examples = len(features)
    if not features:
        reason = f"; first: {stats.notes[0]}" if stats.notes else ""
        raise DataError(f"{rows.source}: no usable examples ({stats.truncated} truncated and {stats.dropped} dropped "
                        f"at data.max_length={config.data.max_length}, {stats.skipped} skipped{reason})")
    return Examples(features, kept), stats


class ResumableLoader(DataLoader):
    """A DataLoader over a seeded permutation per epoch that remembers how far it got, so a
    run resumed mid-epoch continues with the next batch rather than starting the epoch again.

    Lightning saves ``state_dict()`` in its checkpoints and calls ``load_state_dict`` on resume.

    With an ``objective`` (whose ``units(batch)`` counts what its loss averages over), each
    batch also carries, under ``STEP_KEY``, the counts of the optimizer step it belongs to: the
    ``accumulate`` consecutive batches of the epoch that are accumulated into one update (the
    last step of an epoch may have fewer). The step's batches are collated together when its
    first one is served, so the counts of the whole step are known before its first forward
    pass (see ``lft.objective``).
    """

    #: With ``lengths``, the shuffled order is cut into groups of this many batches, each group is
    #: sorted by length and batched, and the batches are shuffled: similar lengths share a batch.
    GROUP_BATCHES = 50

    def __init__(self, dataset: list, batch_size: int, collate_fn: Any, seed: int, shuffle: bool = True,
                 drop_last: bool = False, rank: int = 0, world_size: int = 1, lengths: list[int] | None = None,
                 accumulate: int = 1, objective: Any = None):
        self._seed = seed
        self._accumulate = max(1, int(accumulate))
        self._objective = objective
        self._steps = 0  # serial of the optimizer step whose batches are being served
        self._lengths = lengths
        self._rank = rank
        self._world = world_size
        self._shuffle = shuffle
        self._epoch = 0
        self._consumed = 0
        self._resume_at = 0
        self._served: deque[tuple[int, list[int]]] = deque(maxlen=64)  # (serial, dataset indices)
        self._serial = 0
        super().__init__(dataset, batch_size=batch_size, collate_fn=collate_fn, shuffle=False, drop_last=drop_last)

    def _order(self, epoch: int) -> list[int]:
        order = list(range(len(self.dataset)))
        if self._shuffle:
            random.Random(self._seed * 1000003 + epoch).shuffle(order)
        if self._world > 1:  # every rank sees its own equal share of the same permutation
            order = order[: len(order) - len(order) % self._world][self._rank:: self._world]
        return order

    def _batches(self, epoch: int) -> list[list[int]]:
        order = self._order(epoch)
        size = self.batch_size
        if self._lengths is None:
            batches = [order[i: i + size] for i in range(0, len(order), size)]
        else:
            group = size * self.GROUP_BATCHES
            batches = []
            for g in range(0, len(order), group):
                ranked = sorted(order[g: g + group], key=lambda i: -self._lengths[i])
                batches += [ranked[i: i + size] for i in range(0, len(ranked), size)]
        if self.drop_last and batches and len(batches[-1]) < size:
            batches.pop()
        if self._lengths is not None and self._shuffle:
            random.Random(self._seed * 1000003 + epoch + 7919).shuffle(batches)
        return batches

    def __iter__(self) -> Iterator[Any]:
        batches = self._batches(self._epoch)
        start, self._resume_at = self._resume_at, 0
        self._consumed = start
        step: dict[int, Any] = {}
        for index in range(start, len(batches)):
            if self._objective is None:
                batch = self.collate_fn([self.dataset[i] for i in batches[index]])
            else:
                if index not in step:
                    step = self._collate_step(batches, index)
                batch = step.pop(index)
            self._consumed = index + 1
            self._served.append((self._serial, batches[index]))
            self._serial += 1
            yield batch
        self._epoch += 1
        self._consumed = 0

    def _collate_step(self, batches: list[list[int]], index: int) -> dict[int, Any]:
        """The collated batches of the optimizer step that holds batch ``index``, from ``index`` on,
        each tagged with the counts of its units and of the whole step's."""
        from lft.objective import add_units, units_of

        first = index - index % self._accumulate
        members = range(first, min(first + self._accumulate, len(batches)))
        collated = {i: self.collate_fn([self.dataset[j] for j in batches[i]]) for i in members}
        counts = {i: units_of(self._objective, collated[i]) for i in members}
        totals = add_units(list(counts.values()))
        self._steps += 1
        for i in members:
            collated[i][STEP_KEY] = {"step": self._steps, "units": counts[i], "totals": totals, "size": len(members)}
        return {i: b for i, b in collated.items() if i >= index}

    def __len__(self) -> int:
        n = len(self.dataset) // self._world
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def rows_of(self, serial: int) -> list[str] | None:
        """Where the rows of the ``serial``-th batch this loader served (counting from 0) came
        from, when the dataset is ``Examples``; None when unknown."""
        where = getattr(self.dataset, "where", None)
        for number, indices in self._served:
            if number == serial and where is not None:
                return [where[i] for i in indices]
        return None

    def state_dict(self) -> dict:
        return {"epoch": self._epoch, "consumed": self._consumed}

    def load_state_dict(self, state: dict) -> None:
        self._epoch = int(state.get("epoch", 0))
        self._resume_at = int(state.get("consumed", 0))


class LftDataModule(L.LightningDataModule):
    """Holds formatted examples; batches them through ``lft_collate``."""

    def __init__(self, train: list[dict], eval: list[dict] | None, hook: Any, tokenizer: Any, config: Any,
                 objective: Any = None):
        super().__init__()
        self.objective = objective  # counts the units of each optimizer step (``lft.objective``)
        self.train_features = train
        self.eval_features = eval or []
        self.hook = hook
        self.tokenizer = tokenizer
        self.config = config
        self._train_loader: ResumableLoader | None = None

    def collate(self, features: list[dict]) -> dict:
        batch = self.hook.lft_collate(features=features, tokenizer=self.tokenizer, config=self.config)
        if batch is None:
            raise DataError("no selected plugin could collate a batch")
        return batch

    def train_dataloader(self) -> ResumableLoader:
        if self._train_loader is None:
            cfg = self.config.trainer
            trainer = getattr(self, "trainer", None)
            rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
            lengths = ([sum(len(v) for k, v in f.items() if k.endswith("input_ids")) for f in self.train_features]
                       if self.config.data.group_by_length else None)
            # Objectives that step the optimizer themselves (online methods) count their own units.
            counted = self.objective is not None and not callable(getattr(self.objective, "training_step", None))
            self._train_loader = ResumableLoader(self.train_features, cfg.batch_size, self.collate, cfg.seed,
                                                 rank=rank, world_size=world, lengths=lengths,
                                                 accumulate=cfg.grad_accum,
                                                 objective=self.objective if counted else None)
        return self._train_loader

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.eval_features, batch_size=self.config.trainer.batch_size, collate_fn=self.collate)

    def eval_loader(self, batch_size: int | None = None) -> DataLoader:
        return DataLoader(self.eval_features, batch_size=batch_size or self.config.trainer.batch_size,
                          collate_fn=self.collate)


def pad_collate(features: list[dict], pad_id: int) -> dict:
    """Right-pad ``*input_ids`` with ``pad_id`` and ``*labels`` with -100; add attention masks.
    Other keys whose values are numbers (or equal-length lists of numbers) become tensors."""
    batch: dict[str, Any] = {}
    keys = list(features[0])
    for key in keys:
        values = [f[key] for f in features]
        if key.endswith("input_ids") or key.endswith("labels"):
            fill = pad_id if key.endswith("input_ids") else IGNORE_INDEX
            width = max(len(v) for v in values)
            tensor = torch.full((len(values), width), fill, dtype=torch.long)
            for i, v in enumerate(values):
                tensor[i, : len(v)] = torch.as_tensor(v, dtype=torch.long)
            batch[key] = tensor
            if key.endswith("input_ids"):
                mask = torch.zeros((len(values), width), dtype=torch.long)
                for i, v in enumerate(values):
                    mask[i, : len(v)] = 1
                batch[key[: -len("input_ids")] + "attention_mask"] = mask
        elif key.endswith("attention_mask"):
            continue
        elif all(isinstance(v, (int, float, bool)) for v in values):
            batch[key] = torch.tensor(values)
        else:
            batch[key] = values
    return batch

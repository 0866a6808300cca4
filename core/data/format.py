"""Formatting rows into examples through the ``lft_format_example`` hook, with truncation, skipping
and counts, and the default padding collate."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from lft.data.files import Rows
from lft.errors import DataError
from lft.losses.logprobs import IGNORE_INDEX


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
    return sum(
        sum(1 for t in v if t != IGNORE_INDEX)
        for k, v in feature.items()
        if k.endswith("labels") and isinstance(v, list)
    )


def format_row(row: dict, where: str, hook: Any, tokenizer: Any, config: Any, stats: FormatStats) -> dict | None:
    """``lft_format_example`` on one row, counted in ``stats``: the feature, or None for a row
    left out (skipped by the hook, dropped at max_length, or with nothing left to train on)."""
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
        return None
    length = _length(feature)
    if feature.pop("truncated", False) or length > config.data.max_length:
        if config.data.truncation == "error":
            raise DataError(f"{where}: example is longer than data.max_length={config.data.max_length} tokens")
        if config.data.truncation == "drop":
            stats.dropped += 1
            return None
        stats.truncated += 1
    trained = _trained(feature)
    if trained == 0 and any(k.endswith("labels") for k in feature):
        stats.skipped += 1
        if len(stats.notes) < 3:
            stats.notes.append(f"{where}: skipped (no trained tokens left after truncation)")
        return None
    stats.longest = max(stats.longest, length)
    stats.tokens += length
    stats.trained_tokens += trained
    stats.examples += 1
    return feature


def format_rows(rows: Rows, hook: Any, tokenizer: Any, config: Any) -> tuple[Examples, FormatStats]:
    """Run ``lft_format_example`` on every row. Rows the hook returns ``{"skip": reason}`` for
    are left out and counted; DataErrors get the row's location added."""
    stats = FormatStats(rows=len(rows))
    features, kept = [], []
    for row, where in zip(rows.rows, rows.where):
        feature = format_row(row, where, hook, tokenizer, config, stats)
        if feature is not None:
            features.append(feature)
            kept.append(where)
    if not features:
        reason = f"; first: {stats.notes[0]}" if stats.notes else ""
        raise DataError(
            f"{rows.source}: no usable examples ({stats.truncated} truncated and {stats.dropped} dropped "
            f"at data.max_length={config.data.max_length}, {stats.skipped} skipped{reason})"
        )
    return Examples(features, kept), stats


def pad_collate(features: list[dict], pad_id: int) -> dict:
    """Right-pad ``*input_ids`` with ``pad_id`` and ``*labels`` with -100; add attention masks.
    ``*position_ids`` (packed rows) continue into the padding as a block of their own, counted
    from 0, so the padding attends to nothing real. Other keys whose values are numbers (or
    equal-length lists of numbers) become tensors."""
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
        elif key.endswith("position_ids"):
            width = max(len(v) for v in values)
            tensor = torch.arange(width, dtype=torch.long).repeat(len(values), 1)
            for i, v in enumerate(values):
                tensor[i, : len(v)] = torch.as_tensor(v, dtype=torch.long)
                tensor[i, len(v) :] = torch.arange(width - len(v))
            batch[key] = tensor
        elif key.endswith("attention_mask"):
            continue
        elif all(isinstance(v, (int, float, bool)) for v in values):
            batch[key] = torch.tensor(values)
        else:
            batch[key] = values
    return batch

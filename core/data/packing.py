"""Packing: several examples in one row, so that rows of very different lengths waste no padding.

An example here is a causal-LM example, ``input_ids`` and ``labels`` of equal length. A packed row
is the concatenation of some examples with ``position_ids`` that restart at 0 at each of them. The
model then attends within each example only: transformers derives a block-diagonal causal mask
from position ids that restart (when no attention mask is passed), and its flash-attention
path reads the same boundaries for the variable-length kernels. The first label of each example is masked, so
no example is trained to predict its first token from the one before it; an unpacked example never
predicts its first token either (the model predicts position t + 1 from t), so a packed batch has
exactly the trained tokens, the loss and the gradients of the same examples unpacked.

* ``pack``: best-fit-decreasing bin packing of a set of examples into rows of at most
  ``max_length`` tokens (``data.packing``);
* ``concatenate``: one row from a batch's examples, no bin packing and no pad token
  (``data.padding_free``; ``drops_padding`` says when, for ``auto``).
"""

from __future__ import annotations

import bisect
from typing import Any, Sequence

from lft.errors import ConfigError
from lft.losses.logprobs import IGNORE_INDEX

#: The keys a packable example has; anything else cannot be concatenated meaningfully.
KEYS = ("input_ids", "labels")
#: ``data.padding_free=auto`` drops the padding of a batch that is more than this share padding.
AUTO_PADDING_SHARE = 0.25


def drops_padding(setting: Any, attention_mask: Any = None, lengths: Sequence[int] | None = None) -> bool:
    """Whether a batch goes through the model without its padding under ``data.padding_free``:
    always (true), never (false), or (auto) when more than ``AUTO_PADDING_SHARE`` of it is padding,
    judged from its ``attention_mask`` or from its rows' ``lengths``."""
    if setting is True or setting is False:
        return setting
    if attention_mask is not None:
        total, real = attention_mask.numel(), int(attention_mask.sum())
    elif lengths:
        total, real = max(lengths) * len(lengths), sum(lengths)
    else:
        return False
    return total > 0 and 1 - real / total > AUTO_PADDING_SHARE


def packable(features: Sequence[dict[str, Any]]) -> bool:
    """Whether every example is a plain causal-LM example (``input_ids`` and ``labels`` only)."""
    return all(set(f) == set(KEYS) for f in features)


def concatenate(features: Sequence[dict[str, Any]]) -> dict[str, list[int]]:
    """One row: the examples one after another, positions restarting at each, the first label of
    each masked."""
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for feature in features:
        n = len(feature["input_ids"])
        ids += list(feature["input_ids"])
        labels += [IGNORE_INDEX, *list(feature["labels"])[1:]] if n else []
        positions += list(range(n))
    return {"input_ids": ids, "labels": labels, "position_ids": positions}


def bins(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: the indices of ``lengths`` in bins of at most ``capacity``, the longest
    placed first, each into the fullest bin it still fits. Deterministic: ties keep index order.
    Each bin lists its members in their original order."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    free: list[tuple[int, int]] = []  # (space left, bin number), sorted
    members: list[list[int]] = []
    for i in order:
        size = lengths[i]
        if size > capacity:
            raise ConfigError(f"an example of {size} tokens is longer than data.max_length={capacity}")
        at = bisect.bisect_left(free, (size, -1))
        if at < len(free):
            space, number = free.pop(at)
            members[number].append(i)
            bisect.insort(free, (space - size, number))
        else:
            members.append([i])
            bisect.insort(free, (capacity - size, len(members) - 1))
    return [sorted(m) for m in members]


def pack(features: Sequence[dict[str, Any]], max_length: int, where: Sequence[str] | None = None) -> tuple[list, list]:
    """``(rows, where)``: the examples packed into rows of at most ``max_length`` tokens, and for
    each row the locations of its examples (joined with ``+``)."""
    groups = bins([len(f["input_ids"]) for f in features], max_length)
    rows = [concatenate([features[i] for i in group]) for group in groups]
    places = ["+".join(str(where[i]) for i in group) for group in groups] if where is not None else []
    return rows, places

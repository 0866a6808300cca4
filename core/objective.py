"""The objective contract: what ``lft_loss`` returns, and how the engine turns its loss into the
update of one large batch whatever the batch shape.

An objective's loss is an average: over trained tokens (SFT, an NLL term), over preference
pairs (DPO), over sequences (GRPO) and so on. A mean taken inside each micro-batch is the wrong
update under gradient accumulation and data parallelism whenever micro-batches hold different
numbers of those items: a micro-batch of 4 tokens would count as much as one of 400. So an
objective says what its loss averages over, and lft does the rest:

* ``units(batch)`` counts each unit in a micro-batch, from the batch alone (before any forward
  pass), e.g. ``{"tokens": tensor(412)}`` or ``{"pairs": tensor(4), "tokens": tensor(95)}``;
* ``__call__(module, batch)`` returns ``(loss, metrics)``, where ``loss`` is the mean over the
  micro-batch's items: one tensor when ``units`` names one unit, or a dict ``{unit: mean}``
  when the loss adds terms averaged over different units (DPO's pair loss plus an NLL over the
  chosen tokens).

Before the first micro-batch of an optimizer step, the engine counts every unit over all the
micro-batches of the step and, under DDP/FSDP, over every process (one all-reduce of the counts
per step). Each micro-batch then contributes ``sum over units of mean * count / step count``, which
is exactly the loss of the whole step taken as one batch, and what is logged as the step's loss.
See docs/concepts.md ("How lft averages a loss").
"""

from __future__ import annotations

from typing import Any, Mapping, Protocol, Union, runtime_checkable

import torch

from lft.losses.logprobs import IGNORE_INDEX

#: Counts of the units a loss averages over, in one micro-batch or one step.
Units = Mapping[str, Union[torch.Tensor, int, float]]
#: A loss: the mean over one unit, or ``{unit: mean}`` for a sum of terms over several units.
Loss = Union[torch.Tensor, Mapping[str, torch.Tensor]]


@runtime_checkable
class ObjectiveContract(Protocol):
    """What every objective provides (``Objective`` below gives the defaults)."""

    #: The run takes ``module.reference``, the model as training starts, before the first update.
    needs_reference: bool

    def units(self, batch: Mapping[str, Any]) -> Units:
        """How many of each unit the loss of ``batch`` averages over."""
        ...

    def __call__(self, module: Any, batch: Mapping[str, Any]) -> tuple[Loss, Mapping[str, Any]]:
        """``(loss, metrics)`` of one micro-batch: the loss as means over its units (see above)."""
        ...


class Objective:
    """Base class of objectives: a loss averaged over the rows of the batch, no reference.
    Subclasses override ``units`` when the loss averages over anything else."""

    needs_reference: bool = False

    def units(self, batch: Mapping[str, Any]) -> Units:
        return {"rows": batch_rows(batch)}

    def __call__(self, module: Any, batch: Mapping[str, Any]) -> tuple[Loss, Mapping[str, Any]]:
        raise NotImplementedError(f"{type(self).__name__} must compute its loss in __call__(module, batch)")


def batch_rows(batch: Mapping[str, Any]) -> int:
    """Rows in a batch: the first dimension of its first ``*input_ids`` tensor (or of any tensor)."""
    tensors = [v for k, v in batch.items() if torch.is_tensor(v) and v.ndim > 0]
    ids = [v for k, v in batch.items() if k.endswith("input_ids") and torch.is_tensor(v)]
    first = (ids or tensors or [None])[0]
    return int(first.shape[0]) if first is not None else 1


def trained_tokens(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Tokens a causal LM is trained to predict in ``labels``: those after the first position
    (the model predicts position t + 1 from t) that are not ``ignore_index``."""
    return (labels[..., 1:] != ignore_index).sum()


def units_of(objective: Any, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """``objective.units(batch)`` as float64 tensors; objectives that predate the contract
    (no ``units``) average over rows."""
    counter = getattr(objective, "units", None)
    counts = counter(batch) if callable(counter) else {"rows": batch_rows(batch)}
    if not counts:
        raise ValueError(f"{type(objective).__name__}.units returned no unit")
    return as_units(counts)


def as_units(counts: Units) -> dict[str, torch.Tensor]:
    """Counts as float64 CPU tensors, ready to be added and all-reduced."""
    return {k: torch.as_tensor(v, dtype=torch.float64).detach().cpu() for k, v in counts.items()}


def add_units(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for part in parts:
        for key, value in part.items():
            out[key] = out.get(key, torch.zeros((), dtype=torch.float64)) + value
    return out


def as_terms(loss: Loss, counts: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """``loss`` as ``{unit: mean}``: a single tensor is the mean over the objective's only unit."""
    if isinstance(loss, Mapping):
        terms = dict(loss)
    elif len(counts) != 1:
        raise ValueError(f"the objective averages over {', '.join(counts)} but returned one loss; return "
                         "{unit: mean} with one term per unit")
    else:
        terms = {next(iter(counts)): loss}
    unknown = sorted(set(terms) - set(counts))
    if unknown:
        raise ValueError(f"the loss has terms for {', '.join(unknown)}, which the objective's units() does not count "
                         f"(it counts {', '.join(counts) or 'nothing'})")
    return terms


class HeldOutLoss:
    """The loss of a whole held-out set as one batch: each batch's terms times their units,
    added up, divided by the units of the set (what ``step_share`` does for one step)."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, float] = {}

    def add(self, loss: Loss, counts: Mapping[str, Any]) -> None:
        for unit, mean in as_terms(loss, counts).items():
            self.sums[unit] = self.sums.get(unit, 0.0) + float(mean) * float(counts[unit])
            self.counts[unit] = self.counts.get(unit, 0.0) + float(counts[unit])

    def value(self) -> float | None:
        return sum(self.sums[u] / max(self.counts[u], 1.0) for u in self.sums) if self.sums else None


def step_share(loss: Loss, counts: Mapping[str, torch.Tensor], totals: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """This micro-batch's part of the step's loss: ``sum over units of mean * count / total``.

    SFT, two micro-batches of 4 and 12 trained tokens with mean NLLs 2.0 and 1.0: the step's
    loss is 2.0 * 4 / 16 + 1.0 * 12 / 16 = 1.25, the token mean of all 16 tokens (a mean of
    the two means would say 1.5).
    """
    share: torch.Tensor | None = None
    for unit, mean in as_terms(loss, counts).items():
        weight = float(counts[unit]) / max(float(totals[unit]), 1.0)
        part = mean * weight
        share = part if share is None else share + part
    assert share is not None
    return share


def reduce_units(totals: Mapping[str, torch.Tensor], strategy: Any) -> dict[str, torch.Tensor]:
    """Sum step counts over every process, in one all-reduce (a no-op in a single process)."""
    keys = sorted(totals)
    world = int(getattr(strategy, "world_size", 1) or 1) if strategy is not None else 1
    if world <= 1:
        return {k: totals[k] for k in keys}
    packed = torch.stack([totals[k].to(torch.float64) for k in keys]).to(strategy.root_device)
    summed = strategy.reduce(packed, reduce_op="sum")
    return {k: summed[i].detach().cpu() for i, k in enumerate(keys)}

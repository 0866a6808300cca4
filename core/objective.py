"""The objective contract: what ``lft_objective`` returns, and how the engine turns its loss into the
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

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence, Union

import torch

from lft.losses.logprobs import IGNORE_INDEX

if TYPE_CHECKING:
    from lft.train.module import LftModule

#: Counts of the units a loss averages over, in one micro-batch or one step.
Units = Mapping[str, Union[torch.Tensor, int, float]]
#: A loss: the mean over one unit, or ``{unit: mean}`` for a sum of terms over several units.
Loss = Union[torch.Tensor, Mapping[str, torch.Tensor]]


@dataclass
class RowTexts:
    """The texts of one raw data row by role, as the objective's plugin reads the row: for the
    guards that look at data before it is formatted (lint, contamination, the template check)."""

    #: What the model is asked before each trained answer: strings, or message lists (the
    #: conversation up to the turn that is trained).
    prompts: list[Any] = field(default_factory=list)
    #: Each trained answer: a string, or a message list whose assistant turns are trained.
    answers: list[Any] = field(default_factory=list)
    #: Answers that must differ for the row to teach anything (a preference pair's two sides).
    contrasts: list[tuple[Any, Any]] = field(default_factory=list)


class Objective:
    """Base class of every objective, and the contract the engine calls. ``lft_objective`` returns
    one; a plain callable ``(module, batch) -> (loss, metrics)`` is wrapped in ``FunctionObjective``.

    What every objective has (the defaults below suit an offline loss averaged over rows):

    * ``__call__(module, batch) -> (loss, metrics)``: the loss of one micro-batch as means over its
      units (see the module docstring), and step metrics (floats or 0-d tensors) to log;
    * ``units(batch)``: how many of each unit the loss averages over;
    * ``needs_reference``: set it to have ``module.reference`` (``lft.model.reference.ReferencePolicy``),
      the model as training starts, taken before the first update;
    * ``setup(module)``: called once, before training (attach a head, check the model);
    * ``state_dict()`` / ``load_state_dict(state)``: state that travels with checkpoints;
    * ``notes`` (a dict) and ``warnings`` (lines), added to the run summary at the end.

    How it reports held-out metrics:

    * on held-out batches the engine calls ``__call__`` in eval mode: the loss becomes the held-out
      loss of the whole set (each term weighted by its units), the metrics ``eval_<name>`` (weighted
      by batch size);
    * ``measure(model, tokenizer, features, settings)``: measurements of a model on examples in this
      objective's format that do not depend on how the model was trained (a token NLL, which of a
      pair the model prefers), so that runs of different methods compare on the same data. The run
      and ``lft eval`` call the same code;
    * ``progress_metrics`` name the step metrics shown on the progress line and charted in the
      report; ``summary_metrics`` the held-out ones shown in the run's summary table (everything
      is in summary.json).

    How the guards read its data: ``row_texts(row)`` says which texts of a raw row are prompts,
    which are trained answers, and which answers must differ (``RowTexts``).

    What an online objective adds: see ``OnlineObjective``.
    """

    #: The run gives ``module.reference``, the model as training starts, before the first update.
    needs_reference: bool = False
    #: Step metrics shown on the progress line and charted in the report, besides the loss.
    progress_metrics: tuple[str, ...] = ()
    #: Held-out metrics (without the ``eval_`` prefix) shown in the summary table, besides the loss.
    summary_metrics: tuple[str, ...] = ()
    #: The step metric that is the training reward, if any: the run warns when it rises while the
    #: held-out task metric falls (reward hacking).
    reward_metric: str | None = None
    #: It trains on packed rows (``lft.data.packing``: ``input_ids``, ``labels`` and ``position_ids``
    #: that restart at each example), so ``data.packing`` and ``data.padding_free`` may be used.
    reads_packed_rows: bool = False
    #: Its forward passes honour ``data.padding_free`` themselves (the preference objectives run
    #: chosen and rejected as one row without padding; the online ones their prompt + completion
    #: rows), so the loader's batches stay as they are.
    runs_padding_free: bool = False
    #: Read at the end of the run into the summary; subclasses assign their own.
    notes: Mapping[str, Any] = MappingProxyType({})
    warnings: Sequence[str] = ()

    @property
    def online(self) -> bool:
        """Whether a rollout generates each step's batch (``OnlineObjective``)."""
        return False

    @property
    def steps_optimizer(self) -> bool:
        """Whether ``training_step`` steps the optimizer itself (Lightning manual optimization)."""
        return False

    def setup(self, module: LftModule) -> None:
        """Called once before training, with the ``LftModule``."""

    def units(self, batch: Mapping[str, Any]) -> Units:
        return {"rows": batch_rows(batch)}

    def __call__(self, module: LftModule, batch: Mapping[str, Any]) -> tuple[Loss, Mapping[str, Any]]:
        raise NotImplementedError(f"{type(self).__name__} must compute its loss in __call__(module, batch)")

    def measure(self, model: Any, tokenizer: Any, features: Sequence[Mapping[str, Any]], settings: Any) -> dict:
        """Method-independent measurements on held-out ``features`` (formatted by this objective's
        plugin), without the ``eval_`` prefix; ``settings`` is a ``lft.use.evaluate.Settings``."""
        return {}

    def row_texts(self, row: Mapping[str, Any]) -> RowTexts:
        """The prompts, trained answers and contrasts of a raw row in this objective's format
        (none by default: the guards then skip the checks that need them)."""
        return RowTexts()

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what ``state_dict`` returned, on resume."""


class OnlineObjective(Objective):
    """An objective whose batches are generated by the current policy before every step.

    What it adds to ``Objective``:

    * ``rollout``: the ``lft.online.rollout.RolloutSettings`` that the ``lft_rollout`` hook (the core's
      default: ``lft.online.rollout.experience``) generates each step's experience with;
    * ``training_step(module, experience) -> (loss, metrics)``: the whole update of one step. It
      steps the optimizer itself (several times per batch, as PPO does), clips gradients and steps
      the schedule;
    * ``updates_per_batch``: the optimizer steps one batch takes, so the schedule has the right length.

    Its ``__call__`` is its held-out measurement (a greedy rollout scored by the rewards).
    """

    rollout: Any = None
    updates_per_batch: int = 1

    @property
    def online(self) -> bool:
        return True

    @property
    def steps_optimizer(self) -> bool:
        return True

    def training_step(self, module: LftModule, batch: dict[str, Any]) -> tuple[torch.Tensor, Mapping[str, Any]]:
        raise NotImplementedError(f"{type(self).__name__} must update the policy in training_step(module, batch)")


class FunctionObjective(Objective):
    """A plain callable ``(module, batch) -> (loss, metrics)`` as an objective: a loss over rows."""

    def __init__(self, function: Callable[..., Any]):
        self.function = function

    def __call__(self, module: Any, batch: Mapping[str, Any]) -> tuple[Loss, Mapping[str, Any]]:
        return self.function(module, batch)


def as_objective(value: Any, plugin: str) -> Objective:
    """What ``lft_objective`` returned, as an ``Objective``; anything else is a one-line error."""
    if isinstance(value, Objective):
        return value
    if callable(value):
        return FunctionObjective(value)
    from lft.errors import PluginError

    if value is None:
        raise PluginError(f"the objective {plugin!r} returned no objective from lft_objective")
    raise PluginError(
        f"the objective {plugin!r} returned {type(value).__name__} from lft_objective; expected an "
        "lft.objective.Objective (or a callable (module, batch) -> (loss, metrics))"
    )


def batch_rows(batch: Mapping[str, Any]) -> int:
    """Rows in a batch: the first dimension of its first ``*input_ids`` tensor (or of any tensor)."""
    tensors = [v for k, v in batch.items() if torch.is_tensor(v) and v.ndim > 0]
    ids = [v for k, v in batch.items() if k.endswith("input_ids") and torch.is_tensor(v)]
    found = ids or tensors
    return int(found[0].shape[0]) if found else 1


def trained_tokens(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Tokens a causal LM is trained to predict in ``labels``: those after the first position
    (the model predicts position t + 1 from t) that are not ``ignore_index``."""
    return (labels[..., 1:] != ignore_index).sum()


def units_of(objective: Objective, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """``objective.units(batch)`` as float64 tensors."""
    counts = objective.units(batch)
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
        raise ValueError(
            f"the objective averages over {', '.join(counts)} but returned one loss; return "
            "{unit: mean} with one term per unit"
        )
    else:
        terms = {next(iter(counts)): loss}
    unknown = sorted(set(terms) - set(counts))
    if unknown:
        raise ValueError(
            f"the loss has terms for {', '.join(unknown)}, which the objective's units() does not count "
            f"(it counts {', '.join(counts) or 'nothing'})"
        )
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


def reduce_units(totals: Mapping[str, torch.Tensor], strategy: Any, world: int) -> dict[str, torch.Tensor]:
    """Sum step counts over the ``world`` processes of ``strategy`` (a Lightning strategy), in one
    all-reduce (a no-op in a single process)."""
    keys = sorted(totals)
    if world <= 1:
        return {k: totals[k] for k in keys}
    packed = torch.stack([totals[k].to(torch.float64) for k in keys]).to(strategy.root_device)
    summed = strategy.reduce(packed, reduce_op="sum")
    return {k: summed[i].detach().cpu() for i, k in enumerate(keys)}

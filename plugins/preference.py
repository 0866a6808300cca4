"""What the pairwise preference objectives share (dpo, orpo, simpo; reward reuses the data path).

* Data: ``prompt``, ``chosen``, ``rejected``, each a string or a list of messages (a row with
  conversational ``chosen``/``rejected`` and no ``prompt`` takes their shared first messages as
  the prompt). Each completion is formatted with its prompt through the tokenizer's chat
  template, and only the completion's tokens are scored (``lft.plugins.pairs``).
* One forward pass per batch: chosen and rejected sequences are concatenated, and their
  log-probs come from ``lft.model.forward.token_logprobs``, which never forms full-vocabulary logits
  for the batch (``lft.plugins.pairs``).
* Metrics every step, the reference policy (``module.reference``), an optional precomputed and
  cached reference, and a check that policy and reference start equal. Methods: see ``Preference``.
"""

from __future__ import annotations

import logging
from typing import Any, Literal, Mapping

import torch
from pydantic import Field

import lft
from lft.config import Section, own_settings
from lft.data import task
from lft.losses.preference import PairLogps, PairLoss
from lft.model import reference as refmod
from lft.objective import Objective, RowTexts, trained_tokens
from lft.plugins.pairs import TOKEN_KEYS, format_pair, measure_pairs, pair_logps, pair_texts

log = logging.getLogger("lft")
REFERENCE_KEYS = ("ref_chosen_logps", "ref_rejected_logps")
#: Mean |policy - reference| log-prob per token on the first batch above which they "differ".
START_TOLERANCE = 0.02


class PreferenceOptions(Section):
    bad_pairs: Literal["skip", "error"] = Field(
        "skip",
        description="A pair with an empty completion, or with chosen identical to rejected: skip it "
        "(counted, and the first few named) or stop with an error.",
    )
    use_chat_template: bool = Field(
        True,
        description="Format string prompts and completions as a user and an "
        "assistant turn through the tokenizer's chat template.",
    )
    chat_template: str | None = Field(None, description="A Jinja chat template to use instead of the tokenizer's.")


# -- the objective ---------------------------------------------------------------------------------


class DisplacementWatch:
    """Likelihood displacement (Razin et al. 2024, https://arxiv.org/abs/2410.08847): the reward
    margin grows while the chosen completions become less likely. Over the last ``window`` steps,
    the chosen log-prob per token is compared with the reference's (or, for a reference-free loss,
    with its own mean over the first ``window`` steps), and the margin with its first-window mean;
    a fall of more than ``tolerance`` nats per token while the margin grew counts."""

    def __init__(self, window: int = 10, tolerance: float = 0.1):
        self.window, self.tolerance = window, tolerance
        self.first: list[tuple[float, float]] = []
        self.recent: list[tuple[float, float]] = []

    def update(self, step: int, chosen: float, margin: float, relative: bool) -> str | None:
        """``chosen``: mean log-prob per token of the chosen completions, minus the reference's
        when ``relative``; ``margin``: the mean reward margin."""
        if len(self.first) < self.window:
            self.first.append((chosen, margin))
        self.recent = (self.recent + [(chosen, margin)])[-self.window :]
        if len(self.recent) < self.window:
            return None
        mean = lambda rows, i: sum(r[i] for r in rows) / len(rows)  # noqa: E731
        fall = -mean(self.recent, 0) if relative else mean(self.first, 0) - mean(self.recent, 0)
        grown = mean(self.recent, 1) - mean(self.first, 1)
        if fall > self.tolerance and grown > 0:
            baseline = "under the reference" if relative else "at the start of training"
            return (
                f"likelihood displacement at step {step}: the chosen completions are {fall:.2f} nats per token "
                f"less likely than {baseline} while the reward margin grew by {grown:.2f}; the model lowers "
                "rejected answers faster than it keeps chosen ones (consider a lower trainer.lr, or an NLL "
                "term on the chosen answers: dpo.nll_weight=1, simpo.nll_weight=1, or orpo)"
            )
        return None


class PreferenceObjective(Objective):
    """``(module, batch) -> (loss, metrics)`` for a pairwise loss over summed completion log-probs.
    The loss is a mean over pairs, plus any NLL term's mean over the chosen completions' tokens."""

    progress_metrics = ("accuracy", "margin", "reward")
    summary_metrics = ("accuracy", "margin")
    runs_padding_free = True

    def __init__(self, loss: Any, chunk: int = 1024):
        self.loss = loss
        self.chunk = chunk
        self.needs_reference = bool(getattr(loss, "needs_reference", False))
        self.warnings: list[str] = []
        self.notes: dict[str, Any] = {}
        self.watch = DisplacementWatch()
        self._start_checked = False

    def warn(self, message: str) -> None:
        if message not in self.warnings:
            self.warnings.append(message)
            log.warning("warning: %s", message)

    def units(self, batch: Mapping[str, Any]) -> dict:
        return {"pairs": batch["chosen_input_ids"].shape[0], "chosen_tokens": trained_tokens(batch["chosen_labels"])}

    def reference_logps(
        self, model: Any, batch: Mapping[str, Any], pad_id: int, padding_free: bool | str = False
    ) -> dict[str, torch.Tensor]:
        sums, _ = pair_logps(model, batch, pad_id, self.chunk, padding_free)
        size = batch["chosen_input_ids"].shape[0]
        return {"ref_chosen_logps": sums[:size], "ref_rejected_logps": sums[size:]}

    def logps(self, module: Any, batch: Mapping[str, Any]) -> PairLogps:
        pad_id = module.tokenizer.pad_token_id
        flat = module.config.data.padding_free  # chosen and rejected as one row, no padding
        ref = None  # first: its transient memory is gone before the policy's graph is built
        if self.needs_reference and all(key in batch for key in REFERENCE_KEYS):
            ref = {key: batch[key] for key in REFERENCE_KEYS}
        elif self.needs_reference:
            with module.reference.model() as reference:
                ref = self.reference_logps(reference, batch, pad_id, flat)
        sums, counts = pair_logps(module.model, batch, pad_id, self.chunk, flat)
        size = batch["chosen_input_ids"].shape[0]
        pairs = PairLogps(sums[:size], sums[size:], counts[:size], counts[size:])
        if ref is not None:
            pairs.ref_chosen = ref["ref_chosen_logps"].to(sums.device, sums.dtype)
            pairs.ref_rejected = ref["ref_rejected_logps"].to(sums.device, sums.dtype)
        return pairs

    def __call__(self, module: Any, batch: Mapping[str, Any]) -> tuple[torch.Tensor, dict]:
        pairs = self.logps(module, batch)
        out = self.loss(pairs)
        metrics = self.metrics(pairs, out)
        if module.model.training:
            self.observe(module, pairs, out)
        return out.by_unit(), metrics

    @staticmethod
    def metrics(pairs: PairLogps, out: PairLoss) -> dict[str, torch.Tensor]:
        chosen, rejected = out.chosen_rewards, out.rejected_rewards
        metrics = {
            "rewards_chosen": chosen.mean(),
            "rewards_rejected": rejected.mean(),
            # a tie (the policy is the reference at the start) counts half, not as a wrong answer
            "margin": (chosen - rejected).mean(),
            "accuracy": pair_accuracy(chosen, rejected),
            # the model's own preference: the chosen completion is the more likely one
            "preference_accuracy": (pairs.chosen > pairs.rejected).float().mean(),
            "logps_chosen": pairs.chosen.detach().mean(),
            "logps_rejected": pairs.rejected.detach().mean(),
        }
        if pairs.ref_chosen is not None and pairs.ref_rejected is not None:
            metrics.update(ref_logps_chosen=pairs.ref_chosen.mean(), ref_logps_rejected=pairs.ref_rejected.mean())
        metrics.update(out.metrics)
        return metrics

    def measure(self, model: Any, tokenizer: Any, features: Any, settings: Any) -> dict:
        return measure_pairs(model, tokenizer, features, settings)

    def row_texts(self, row: Mapping[str, Any]) -> RowTexts:
        return pair_texts(row)

    def observe(self, module: Any, pairs: PairLogps, out: PairLoss) -> None:
        """Training-time checks: policy equals reference at the start; likelihood displacement."""
        relative = pairs.ref_chosen is not None and pairs.ref_rejected is not None
        if relative and not self._start_checked and module.global_step == 0:
            self._start_checked = True
            gap = float(torch.cat(pairs.logratios(per_token=True)).detach().abs().mean())
            self.notes["reference_start_gap"] = round(gap, 6)
            if gap > START_TOLERANCE:
                self.warn(
                    f"the policy and the reference differ before training (mean |log-prob difference| "
                    f"{gap:.3f} nats per token on the first batch): the reference should be the model "
                    "training starts from; look for a stale reference cache or an adapter trained earlier"
                )
        chosen = pairs.logratios(per_token=True)[0] if relative else pairs.chosen_mean()
        margin = (out.chosen_rewards - out.rejected_rewards).mean()
        message = self.watch.update(module.global_step, float(chosen.detach().mean()), float(margin), relative)
        if message and not any(w.startswith("likelihood displacement") for w in self.warnings):
            self.warn(message)


def pair_accuracy(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """The share of pairs whose chosen reward is the higher, a tie counting half."""
    return ((chosen > rejected).float() + 0.5 * (chosen == rejected).float()).mean()


def precompute_callback(use_cache: bool = True) -> Any:
    """A callback that computes the reference log-probs of every train and eval pair once, when
    fitting starts (through the disk cache), then frees a frozen reference copy."""
    import lightning as L

    class PrecomputeReference(L.Callback):
        def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
            precompute_pairs(trainer, pl_module, use_cache)

    return PrecomputeReference()


def precompute_pairs(trainer: Any, module: Any, use_cache: bool = True) -> None:
    objective, reference, datamodule = module.objective, module.reference, trainer.datamodule
    if getattr(datamodule, "stream", None) is not None:
        raise lft.ConfigError(
            "precompute_reference=true needs every training row before training, and "
            "data.streaming=true reads them as training goes; set one of them to false"
        )
    pad_id = module.tokenizer.pad_token_id
    cache = refmod.ReferenceCache() if use_cache else None
    parts = (
        reference.fingerprint(),
        refmod.tokenizer_fingerprint(module.tokenizer),
        str(trainer.precision),
        "summed completion log-probs",
    )
    for split, features in (("train", datamodule.train_features), ("eval", datamodule.eval_features)):
        if not features:
            continue
        key = refmod.cache_key(*parts, refmod.data_fingerprint(features, TOKEN_KEYS))
        status = refmod.precompute(
            reference,
            features,
            lambda model, batch: objective.reference_logps(model, batch, pad_id),
            datamodule.collate,
            REFERENCE_KEYS,
            module.config.trainer.batch_size,
            key=key,
            cache=cache,
            device=module.device,
            context=trainer.precision_plugin.forward_context,
        )
        objective.notes[f"reference_{split}"] = (
            f"{len(features)} pairs {'read from' if status == 'cache' else 'computed'}"
            + (f" cache {key}" if cache is not None else "")
        )
    reference.release()


# -- the plugin base ----------------------------------------------------------------------------


class Preference:
    """Base of the pairwise preference objectives. A subclass sets ``name`` and ``options`` and
    returns its loss from ``loss(options)``; it may override ``format_row`` or ``objective``."""

    name = "preference"
    kind = "objective"
    options: type[Section] = PreferenceOptions
    #: Settings for the embedded preference data that make `lft run --plugin NAME` a few minutes on a CPU.
    default_settings: dict[str, Any] = {"trainer.max_steps": 40, "trainer.batch_size": 4, "trainer.lr": 5e-4}

    @lft.hookimpl
    def lft_add_config(self, register: Any) -> None:
        if not issubclass(self.options, PreferenceOptions):
            raise lft.PluginError(
                f"{type(self).__name__}.options must subclass "
                "lft.plugins.preference.PreferenceOptions (the shared data options: bad_pairs, "
                "use_chat_template, chat_template)"
            )
        register(self.name, self.options)

    @lft.hookimpl
    def lft_default_data(self) -> Any:
        return {**task.files("pref"), "settings": own_settings(self.default_settings, self.name, self.options)}

    def format_row(self, example: dict, tokenizer: Any, config: Any) -> dict:
        return format_pair(example, tokenizer, config.section(self.name), config.data.max_length, self.name)

    @lft.hookimpl
    def lft_format_example(self, example: dict, tokenizer: Any, config: Any) -> Any:
        return self.format_row(example, tokenizer, config)

    def loss(self, options: Any) -> Any:
        raise NotImplementedError(f"{type(self).__name__} must return its loss from loss(options)")

    def objective(self, config: Any) -> Any:
        return PreferenceObjective(self.loss(config.section(self.name)), config.trainer.logits_chunk)

    @lft.hookimpl
    def lft_objective(self, config: Any) -> Any:
        return self.objective(config)

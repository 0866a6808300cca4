"""The hook points of lft: the public contract between the engine and its plugins.

Every method in lft, built-in or third-party, is a plugin that implements some of these hooks
with ``@lft.hookimpl``. Only the plugins selected for a run take part in it (plus lft's own
``core`` plugin, which supplies trylast fallbacks).

Two kinds of hook:

* *collect* hooks call every selected implementation and return the list of their results;
* *firstresult* hooks stop at the first non-None result and return it alone.

Implementations run in LIFO registration order unless they ask for ``tryfirst`` or ``trylast``.
docs/plugin-hooks.md documents each hook for plugin authors; a test keeps the two in step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import pluggy

if TYPE_CHECKING:
    import argparse

    import torch
    from lightning.pytorch import Callback
    from pydantic import BaseModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase
    from transformers.utils.quantization_config import QuantizationConfigMixin

    from lft.config import RunConfigBase
    from lft.objective import Objective
    from lft.train.module import LftModule

hookspec = pluggy.HookspecMarker("lft")


@hookspec
def lft_add_config(register: Callable[[str, type[BaseModel]], None]) -> None:
    """Register a plugin's own options section.

    :param register: a callable ``register(section, model)`` where ``section`` is the name of
        the section (for example ``"lora"``) and ``model`` a pydantic ``BaseModel`` subclass
        whose fields, all with defaults, are the options. The section then appears as
        ``lora.r`` in config files, ``key=value`` overrides and ``lft config schema``.

    Called for every installed plugin, selected or not, so that a config file may carry the
    sections of methods it does not use in this run. No return value.
    """


@hookspec(firstresult=True)
def lft_load_model(
    config: RunConfigBase, quantization_config: QuantizationConfigMixin | None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase] | None:
    """Load the model and its tokenizer.

    :param config: the validated ``RunConfig``.
    :param quantization_config: what ``lft_quantization_config`` returned (None: full precision).
    :return: a ``(model, tokenizer)`` tuple, or None to let another plugin load it.

    The core's trylast implementation handles a local HF folder, a hub id, a GGUF file and the
    embedded default model, quantized as ``quantization_config`` says. A
    plugin may wrap the loader (``@lft.hookimpl(wrapper=True)``, ``loaded = yield``) to check or
    adjust whatever model was loaded.

    Stops at the first non-None result.
    """


@hookspec(firstresult=True)
def lft_quantization_config(config: RunConfigBase) -> QuantizationConfigMixin | None:
    """Choose how the base model's weights are quantized at load time.

    :param config: the validated ``RunConfig``.
    :return: a ``transformers`` quantization config (for example ``BitsAndBytesConfig``), or
        None to keep full precision.

    Stops at the first non-None result.
    """


@hookspec(firstresult=True)
def lft_wrap_model(model: PreTrainedModel, config: RunConfigBase, objective: Objective) -> torch.nn.Module | None:
    """Wrap the loaded model for training: add adapters, freeze weights, prepare k-bit layers.

    :param model: the ``PreTrainedModel`` returned by ``lft_load_model``.
    :param config: the validated ``RunConfig``.
    :param objective: the run's ``lft.objective.Objective``, which a wrapper may adapt to (``lora``
        keeps its frozen base in float32 for an online objective that samples in float32).
    :return: the model to train (it may be the same object, or a ``peft.PeftModel``), or None.

    Exactly one model wrapper is selected per run (``lora`` when none is asked for).

    Stops at the first non-None result.
    """


@hookspec(firstresult=True)
def lft_format_example(
    example: dict[str, Any], tokenizer: PreTrainedTokenizerBase, config: RunConfigBase
) -> dict[str, Any] | None:
    """Turn one raw data row into token ids and a label mask, in the objective's format.

    :param example: one row, a dict of column name to value, as read from the data file.
    :param tokenizer: the run's tokenizer.
    :param config: the validated ``RunConfig``.
    :return: a dict of lists (for SFT ``input_ids`` and ``labels``, with -100 on tokens that
        are not trained), or None to skip to the next implementation. Raise ``lft.DataError``
        for a row that cannot be used; the engine adds the file and row number to the message.

    Stops at the first non-None result.
    """


@hookspec(firstresult=True)
def lft_collate(
    features: list[dict[str, Any]], tokenizer: PreTrainedTokenizerBase, config: RunConfigBase
) -> dict[str, Any] | None:
    """Turn a list of formatted examples into one batch.

    :param features: the dicts returned by ``lft_format_example``.
    :param tokenizer: the run's tokenizer (for its pad token).
    :param config: the validated ``RunConfig``.
    :return: a dict of tensors. The core's trylast implementation right-pads every
        ``*input_ids`` with the pad token, every ``*labels`` with -100 and builds the matching
        ``*attention_mask``; other numeric keys are stacked into tensors.

    Stops at the first non-None result.
    """


@hookspec(firstresult=True)
def lft_objective(config: RunConfigBase) -> Objective | Callable[..., Any] | None:
    """Build the run's objective. Called once, before training.

    :param config: the validated ``RunConfig``.
    :return: an ``lft.objective.Objective`` (``OnlineObjective`` for a method that generates its
        own batches), or a plain callable ``objective(module, batch) -> (loss, metrics)``, which
        is taken as an objective averaged over rows. ``module`` is the ``LftModule`` (the model
        is ``module.model``); ``loss`` is a scalar tensor (a mean over the batch's units) or a
        dict ``{unit: mean}`` of terms averaged over different units; ``metrics`` is a dict of
        floats or 0-d tensors to log. ``lft.objective`` documents the whole contract: units,
        the reference, set-up, checkpointed state, held-out measurement, the metrics shown, and
        what an online objective adds.

    Stops at the first non-None result.
    """


@hookspec(firstresult=True)
def lft_rollout(module: LftModule, batch: dict[str, Any], config: RunConfigBase) -> dict[str, Any] | None:
    """Generate experience for online methods (PPO, GRPO) from the current policy.

    Called by the engine at the start of every training step, before the objective.

    :param module: the ``LftModule`` being trained (``module.model``, ``module.tokenizer``,
        ``module.objective``, ``module.hook``; ``module.reference`` when the objective asked for
        a reference policy).
    :param batch: the collated batch of prompts (``prompt_input_ids``,
        ``prompt_attention_mask`` and the data's other columns).
    :param config: the validated ``RunConfig``.
    :return: the batch to hand to the objective instead of ``batch``, or None for offline
        methods, whose batch is used as it is. The core's trylast implementation serves every
        ``lft.objective.OnlineObjective`` with its ``rollout`` settings: it samples with a KV
        cache, scores the tokens under the policy and the reference, calls ``lft_reward``, and
        returns the experience dict described in ``lft.online.rollout``
        (prompts, completions, token ids, masks, per-token log-probs, rewards).

    Stops at the first non-None result.
    """


@hookspec
def lft_reward(
    prompts: list[Any], completions: list[str], batch: dict[str, Any], config: RunConfigBase
) -> dict[str, Any] | None:
    """Score completions. Every selected reward plugin is called and the scores are combined.

    :param prompts: the prompts, one per completion (a string, or the list of messages the data
        gave).
    :param completions: the generated completion strings.
    :param batch: the rollout batch: the data's other columns, one entry per completion (for
        example ``batch["answer"]``), and the tensors of the experience (``completion_ids``,
        ``completion_mask``...).
    :param config: the validated ``RunConfig``.
    :return: a dict ``{"name": str, "scores": list[float], "weight": float}`` or None when
        this plugin does not score this run. The rollout adds up ``weight * scores`` and logs
        each function's mean and std under its name. A score that is not a finite number, or
        an exception, stops the run with one line naming the function and the sample.
    """


@hookspec
def lft_callbacks(config: RunConfigBase) -> list[Callback] | None:
    """Add Lightning callbacks to the run: progress, guards, logging.

    :param config: the validated ``RunConfig``.
    :return: a list of ``lightning.pytorch.Callback`` objects, or None.
    """


@hookspec
def lft_add_commands(cli: argparse._SubParsersAction) -> None:
    """Add subcommands to the ``lft`` command line.

    :param cli: the ``argparse`` subparsers object of ``lft``. Call
        ``cli.add_parser(name, help=...)``, add arguments, and
        ``parser.set_defaults(handler=function)``; the handler gets the parsed
        ``argparse.Namespace`` and returns an exit code (None means 0).

    Called for every installed plugin. No return value.
    """


@hookspec(firstresult=True)
def lft_default_data() -> dict[str, Any] | None:
    """Name the data a run uses when the config gives no training file.

    Called before the config is validated, so that the settings it suggests are validated with
    the rest: it takes no config.

    :return: a dict ``{"train": path, "eval": path_or_None}``, or None. Objectives return the
        embedded task's data in their own format (SFT rows, preference pairs or prompts). An
        optional ``"settings"`` dict of dotted config keys (``{"trainer.max_steps": 60}``) is
        applied to every key the user did not set.

    Stops at the first non-None result.
    """


@hookspec(firstresult=True)
def lft_save_model(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, path: str, config: RunConfigBase
) -> str | None:
    """Save the trained model into ``path`` in its standard format.

    :param model: the trained model (a ``peft.PeftModel`` for adapter methods).
    :param tokenizer: the run's tokenizer, to save beside it.
    :param path: an empty folder; the engine renames it into place when the hook returns, so a
        crash never leaves a half-written result.
    :param config: the validated ``RunConfig``.
    :return: the path written, or None to let the next implementation save. The core's trylast
        implementation calls ``model.save_pretrained`` (safetensors) and
        ``tokenizer.save_pretrained``: a peft adapter folder for LoRA, a transformers model
        folder for full fine-tuning.

    Stops at the first non-None result.
    """

"""lft's own plugin, ``core``: the trylast fallbacks that every run has, and the guards (their
``guards`` config section, their callback, and the ``lft check`` and ``lft inspect`` commands)."""

from __future__ import annotations

from typing import Any

from lft.data.format import pad_collate
from lft.model import loading
from lft.objective import OnlineObjective
from lft.plugin.manager import hookimpl


class CorePlugin:
    """Loads models the standard way, pads batches and generates the experience of online objectives
    (``lft.objective.OnlineObjective``) when no selected plugin does; saves the random states in
    checkpoints, guards against NaN/Inf losses and gradients, and runs the guards against
    fine-tuning pitfalls (``lft.guards``). Adds the commands new-plugin, check, inspect, generate,
    chat, eval, merge and doctor."""

    name = "core"
    kind = "core"

    @hookimpl(trylast=True)
    def lft_load_model(self, config: Any, quantization_config: Any) -> Any:
        return loading.load_model(config, quantization_config=quantization_config)

    @hookimpl(trylast=True)
    def lft_collate(self, features: list, tokenizer: Any, config: Any) -> Any:
        return pad_collate(features, tokenizer.pad_token_id)

    @hookimpl
    def lft_callbacks(self, config: Any) -> Any:
        from lft.guards import GuardMonitor
        from lft.train.checkpoint import RngState
        from lft.train.numerics import NonFiniteGuard

        tc = config.trainer
        guard = NonFiniteGuard(tc.on_nonfinite, config.output, check_gradients=tc.precision != "16-mixed")
        callbacks = [RngState(), guard]
        if config.section("guards").enabled:
            callbacks.append(GuardMonitor(config))
        return callbacks

    @hookimpl(trylast=True)
    def lft_save_model(self, model: Any, tokenizer: Any, path: str, config: Any) -> Any:
        model.save_pretrained(path, safe_serialization=True)
        tokenizer.save_pretrained(path)
        return path

    @hookimpl(trylast=True)
    def lft_rollout(self, module: Any, batch: dict, config: Any) -> Any:
        if not isinstance(module.objective, OnlineObjective):
            return None  # an offline objective: its batch is used as it is
        from lft.online.rollout import experience

        return experience(module, batch, module.objective.rollout)

    @hookimpl
    def lft_add_config(self, register: Any) -> None:
        from lft.guards import GuardsOptions

        register("guards", GuardsOptions)

    @hookimpl
    def lft_add_commands(self, cli: Any) -> None:
        from lft.cli import check, doctor, export, new_plugin, use

        new_plugin.add_command(cli)
        check.add_commands(cli)
        use.add_commands(cli)
        doctor.add_command(cli)
        export.add_command(cli)

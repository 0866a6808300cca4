"""lft: fine-tune language models with plugins on a Lightning core.

The public names:

* ``lft.run(config, plugins=[...])`` runs a job and returns a ``RunResult``;
* ``lft.load(model, adapters={...})`` loads a base with named adapters to generate and evaluate;
* ``lft.merge(adapter, out)`` folds an adapter into its base and saves a plain model folder;
* ``lft.hookimpl`` marks a plugin's hook implementations;
* ``lft.RunConfig`` / ``lft.load_config`` build and validate configurations;
* ``lft.LftError`` and its subclasses are the one-line errors lft reports.
"""

from __future__ import annotations

import logging
from typing import Any

from lft.errors import ConfigError, DataError, LftError, ModelError, PluginError
from lft.plugin.manager import hookimpl

__version__ = "0.1.0"


class _QuietBitsandbytes(logging.Filter):
    """``import peft`` imports bitsandbytes (peft/helpers.py), whose CPU backend then warns that
    its optional fast 4-bit kernel (the ``kernels`` package) is missing: on every run, LoRA runs
    included. The warning is dropped here; a run that quantizes on a CPU says it itself
    (``lft.adapters.quantize.bnb_config``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "gemm_4bit_forward" not in record.getMessage()


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_QuietBitsandbytes())

__all__ = [
    "ConfigError",
    "DataError",
    "LftError",
    "ModelError",
    "PluginError",
    "RunConfig",
    "RunResult",
    "__version__",
    "hookimpl",
    "load",
    "load_config",
    "merge",
    "run",
]


def run(config: Any = None, plugins: Any = (), quiet: bool = False) -> Any:
    """Run a fine-tuning job; see ``lft.train.engine.run``. Returns a ``RunResult``."""
    from lft.train.engine import run as _run

    return _run(config, plugins=plugins, quiet=quiet)


def load(model: Any = None, adapters: Any = None, **options: Any) -> Any:
    """A base model with named adapters on it; see ``lft.use.loaded.load``. Returns a
    ``LoadedModel`` whose ``generate(prompts, adapter=NAME)`` and ``evaluate(...)`` switch per call."""
    from lft.use.loaded import load as _load

    return _load(model, adapters, **options)


def merge(adapter: Any, out: Any, **options: Any) -> dict:
    """Fold an adapter into its base and save a transformers folder; see ``lft.use.loaded.merge``."""
    from lft.use.loaded import merge as _merge

    return _merge(adapter, out, **options)


def load_config(file: Any = None, overrides: Any = (), plugins: Any = ()) -> Any:
    """Resolve a RunConfig (with every installed plugin's section) from a YAML file and
    ``KEY=VALUE`` overrides, validated; raises ``ConfigError`` listing every problem."""
    from lft import config as _config
    from lft.plugin.manager import PluginManager

    manager = PluginManager(extra=plugins)
    cls = _config.config_class(_config.plugin_sections(manager))
    return _config.load(cls, file=file, overrides=overrides)


def __getattr__(name: str) -> Any:
    if name == "RunConfig":
        from lft.config import RunConfigBase

        return RunConfigBase
    if name == "RunResult":
        from lft.train.engine import RunResult

        return RunResult
    raise AttributeError(f"module 'lft' has no attribute {name!r}")

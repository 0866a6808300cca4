"""Using trained models: ``lft.load`` (a base with one or several named adapters, switched per
call), generation, held-out evaluation, and ``lft.merge``.

A saved adapter folder holds ``adapter_config.json`` (peft), the tokenizer with its chat template,
and ``lft_config.yaml``, the config of the run that trained it. The base model is loaded the way
that run loaded it, through the same hooks: a QLoRA adapter gets its 4-bit base back, so the
numbers measured here agree with the run's own summary.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from lft import config as cfgmod
from lft.adapters.attach import attach, read_adapter
from lft.data import task
from lft.data.files import Rows, read_rows
from lft.data.format import format_rows
from lft.errors import ConfigError, DataError, LftError
from lft.objective import Objective, as_objective
from lft.plugin.manager import DEFAULT_OBJECTIVE, PluginManager, Selection
from lft.use import evaluate

#: The name that selects the base model with every adapter switched off.
BASE = "base"
RUN_CONFIG = "lft_config.yaml"


def adapter_specs(adapters: Any) -> dict[str, str]:
    """``{name: folder}`` from a folder, a ``{name: folder}`` mapping, or ``NAME=DIR``/``DIR`` strings.

    An unnamed adapter is named after its folder (the run folder for ``.../final``).
    """
    if adapters is None:
        return {}
    if isinstance(adapters, Mapping):
        items = [(str(k), str(v)) for k, v in adapters.items()]
    else:
        if isinstance(adapters, (str, Path)):
            adapters = [adapters]
        items = []
        for spec in adapters:
            name, sep, folder = str(spec).partition("=")
            items.append((name, folder) if sep and name and "/" not in name else ("", str(spec)))
    out: dict[str, str] = {}
    for name, folder in items:
        if not name:
            path = Path(folder).expanduser().resolve()
            name = path.parent.name if path.name == "final" else path.name
            name = re.sub(r"\W+", "_", name).strip("_") or "adapter"
        if name == BASE or "." in name or not name:
            raise ConfigError(
                f"adapter name {name!r} is not allowed: '{BASE}' means the bare base model, and "
                "names cannot contain '.'"
            )
        if name in out:
            raise ConfigError(f"two adapters are named {name!r}; name them with NAME=DIR")
        out[name] = folder
    return out


def _run_config(adapter: str | None, model: str | None, manager: PluginManager) -> Any:
    """The RunConfig to load with: the adapter's training config, with ``model`` as the base."""
    data: dict = {}
    recorded = Path(adapter).expanduser() / RUN_CONFIG if adapter else None
    if recorded is not None and recorded.is_file():
        data = cfgmod.read_yaml(recorded)
    cls = cfgmod.config_class(cfgmod.plugin_sections(manager))
    data = {k: v for k, v in data.items() if k in cls.model_fields and k not in ("output", "resume", "overwrite")}
    data["plugins"] = [p for p in data.get("plugins") or [] if p in manager.available()]
    if model is not None:
        data["model"] = {**(data.get("model") or {}), "path": str(model), "gguf_file": None}
    elif adapter and not data.get("model"):
        data["model"] = {"path": read_adapter(adapter).get("base_model_name_or_path")}
    from lft.train.engine import resolve_raw_precision

    resolve_raw_precision(data)
    try:
        return cfgmod.build(data, cls)
    except ConfigError as exc:
        raise ConfigError([f"{recorded}: {p}" for p in exc.problems]) from None


def _without_wrapper(manager: PluginManager, names: list[str]) -> list[str]:
    return [n for n in names if manager.infos[n].kind != "wrapper"]


@dataclass
class LoadedModel:
    """A base model with named adapters. ``generate`` and ``evaluate`` take ``adapter=NAME``
    (``"base"`` for the bare base); with exactly one adapter it is the default."""

    model: Any
    tokenizer: Any
    adapters: dict[str, str]
    config: Any
    selection: Selection
    label: str
    trained_quantization: str | None = None
    quantization: str | None = None
    notes: list = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return list(self.adapters)

    def resolve(self, adapter: str | None) -> str:
        if adapter is None:
            if len(self.adapters) > 1:
                raise LftError(
                    f"several adapters are loaded ({', '.join(self.adapters)}); choose one with "
                    f"adapter=NAME, or '{BASE}' for the base model"
                )
            return next(iter(self.adapters), BASE)
        if adapter != BASE and adapter not in self.adapters:
            loaded = ", ".join([*self.adapters, BASE])
            raise LftError(f"no adapter named {adapter!r}; loaded: {loaded}")
        return adapter

    @contextlib.contextmanager
    def using(self, adapter: str | None) -> Iterator[str]:
        """Switch to ``adapter`` for the duration of the block."""
        name = self.resolve(adapter)
        if name == BASE and self.adapters:
            with self.model.disable_adapter():
                yield name
            return
        if name != BASE:
            self.model.set_adapter(name, inference_mode=True)  # switching is cheap: a flag per layer
        yield name

    def generate(
        self,
        prompts: Any,
        adapter: str | None = None,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        batch_size: int = 16,
        system: str | None = None,
        streamer: Any = None,
    ) -> Any:
        """Complete a prompt (a string or a list of messages) or a list of prompts with one
        adapter, through the model's chat template. Returns a string for a string prompt."""
        single = isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], dict))
        items = [prompts] if single else list(prompts)
        if system:
            items = [
                [{"role": "system", "content": system}, {"role": "user", "content": p}] if isinstance(p, str) else p
                for p in items
            ]
        with self.using(adapter):
            out = evaluate.generate(
                self.model,
                self.tokenizer,
                items,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                seed=seed,
                batch_size=batch_size,
                streamer=streamer,
            )
        return out[0] if single else out

    # -- evaluation --------------------------------------------------------------------------------
    def eval_data(
        self, data: Iterable[str] | str | None = None, task_setting: str | None = None, max_rows: int | None = None
    ) -> dict:
        """Read and format held-out data once: ``{"sets": [(objective, features)], "task_rows": ...,
        "files": ...}``.

        Each file is formatted and measured by the objective plugin that reads its rows: the one
        the adapter trained with when it can, else the first offline objective installed that can
        (``sft`` first). Prompt/answer rows of the embedded task are measured by its task metric.
        With no data, the embedded task's held-out SFT and preference files. Rows are capped at
        ``data.max_eval_rows`` like ``lft run``.
        """
        specs = [str(s) for s in ([data] if isinstance(data, (str, Path)) else list(data or []))]
        if not specs:
            specs = [task.files("sft")["eval"], task.files("pref")["eval"]]
        cap = max_rows if max_rows is not None else self.config.data.max_eval_rows
        eval_config = self.config.eval.model_copy(update={"task": task_setting} if task_setting else {})
        prepared: dict[str, Any] = {"sets": [], "task_rows": None, "files": {}}
        for spec in specs:
            rows = read_rows(spec, self.config.data.split)
            if cap and len(rows) > cap:
                rows = rows.subset(list(range(cap)))
            found = self._measurer(rows)
            if found is None and task.is_task_rows(rows.rows):
                prepared["task_rows"] = rows.rows
                prepared["files"]["task"] = {"file": spec, "rows": len(rows)}
                continue
            if found is None:
                raise DataError(f"{spec}: no installed objective reads these rows (columns: {', '.join(rows.rows[0])})")
            name, hook, objective = found
            if name in prepared["files"]:
                raise DataError(
                    f"{spec} and {prepared['files'][name]['file']} are both {name} data; give one file of each form"
                )
            features, _ = format_rows(rows, hook, self.tokenizer, self.config)
            prepared["files"][name] = {"file": spec, "rows": len(rows)}
            prepared["sets"].append((objective, features))
        if prepared["task_rows"] is None:
            embedded = next((s for s in specs if task.is_embedded(s)), None)
            prepared["task_rows"] = evaluate.task_rows(eval_config, embedded)
            if prepared["task_rows"]:
                prepared["files"]["task"] = {
                    "file": str(task.path("prompts", "eval")),
                    "rows": len(prepared["task_rows"]),
                }
        return prepared

    def _measurer(self, rows: Rows) -> tuple[str, Any, Objective] | None:
        """``(objective name, hook relay, objective)`` of the first offline objective whose plugin
        formats the first row: the adapter's own, then ``sft``, then the others by name."""
        manager = self.selection.manager
        others = [n for n in manager.available("objective") if n != self.selection.objective]
        order = [self.selection.objective, *sorted(others, key=lambda n: (n != DEFAULT_OBJECTIVE, n))]
        rest = [n for n in self.selection.names if manager.infos[n].kind not in ("objective", "wrapper")]
        for name in order:
            selection = self.selection if name == self.selection.objective else manager.select([name, *rest])
            objective = as_objective(selection.hook.lft_objective(config=self.config), name)
            if objective.online:
                continue
            try:
                feature = selection.hook.lft_format_example(
                    example=rows.rows[0], tokenizer=self.tokenizer, config=self.config
                )
            except DataError:
                continue
            if feature is not None:
                return name, selection.hook, objective
        return None

    def evaluate(
        self,
        data: Any = None,
        adapter: str | None = None,
        task_setting: str | None = None,
        max_rows: int | None = None,
        prepared: dict | None = None,
    ) -> dict:
        """The measurements of each objective on its held-out data and the task metric, of one
        adapter (or the base), computed by the code behind ``lft run``'s summary."""
        prepared = prepared or self.eval_data(data, task_setting, max_rows)
        settings = evaluate.Settings.from_config(self.config)
        out: dict[str, Any] = {}
        with self.using(adapter):
            for objective, features in prepared["sets"]:
                out.update(
                    {
                        f"eval_{k}": v
                        for k, v in objective.measure(self.model, self.tokenizer, features, settings).items()
                    }
                )
            if prepared["task_rows"]:
                out.update(evaluate.task_measure(self.model, self.tokenizer, prepared["task_rows"], settings))
        return out


def load(
    model: str | None = None, adapters: Any = None, *, full_precision: bool = False, plugins: Iterable[Any] = ()
) -> LoadedModel:
    """Load a base model with any number of named adapters on it.

    :param model: the base: a HF folder, hub id, ``.gguf`` file, or None for the base recorded in
        the (first) adapter, else the embedded default.
    :param adapters: an adapter folder, a ``{name: folder}`` mapping, or ``NAME=DIR`` strings.
    :param full_precision: load the base unquantized even if an adapter was trained on a 4-bit base.
    :param plugins: extra plugin objects, as for ``lft.run``.
    """
    from lft.train.engine import quiet_libraries

    quiet_libraries()
    specs = adapter_specs(adapters)
    for folder in specs.values():
        read_adapter(folder)  # a missing or wrong folder fails before the base is loaded
    manager = PluginManager(extra=list(plugins))
    first = next(iter(specs.values()), None)
    config = _run_config(first, model, manager)
    trained = manager.select(config.plugins)
    trained_q = trained.hook.lft_quantization_config(config=config)
    selection = manager.select(_without_wrapper(manager, trained.names)) if full_precision else trained
    loaded = selection.hook.lft_load_model(
        config=config, quantization_config=trained_q if selection is trained else None
    )
    if loaded is None:
        raise LftError("no plugin could load the model")
    base, tokenizer = loaded
    from lft.model import loading

    label = str(model) if model is not None else str(config.model.path or base.config._name_or_path)
    if loading.is_default(config.model.path):
        label = f"the embedded {loading.DEFAULT_MODEL_NAME}"
    if first is not None and (Path(first).expanduser() / "tokenizer_config.json").is_file():
        tokenizer = loading.load_tokenizer(str(Path(first).expanduser()))  # as the adapter trained with it
    wrapped = attach(base, specs, label) if specs else base.eval()
    for param in wrapped.parameters():
        param.requires_grad_(False)
    loaded_q = _describe_quantization(trained_q if selection is trained else None)
    notes = []
    for name, folder in list(specs.items())[1:]:
        other = _run_config(folder, model, manager)
        other_q = _describe_quantization(manager.select(other.plugins).hook.lft_quantization_config(config=other))
        if other_q != loaded_q:
            notes.append(
                f"adapter {name} was trained on a {other_q or 'full-precision'} base but shares the "
                f"{loaded_q or 'full-precision'} base loaded for {next(iter(specs))}"
            )
    for note in notes:
        warnings.warn(note, stacklevel=2)
    return LoadedModel(
        wrapped,
        tokenizer,
        specs,
        config,
        selection,
        label,
        trained_quantization=_describe_quantization(trained_q),
        quantization=loaded_q,
        notes=notes,
    )


def _describe_quantization(qc: Any) -> str | None:
    if qc is None:
        return None
    if getattr(qc, "load_in_4bit", False):
        return f"4-bit {getattr(qc, 'bnb_4bit_quant_type', '')}".strip()
    if getattr(qc, "load_in_8bit", False):
        return "8-bit"
    return str(getattr(qc, "quant_method", "quantized"))


def merge(
    adapter: str | Path,
    out: str | Path,
    model: str | None = None,
    dtype: str | None = None,
    overwrite: bool = False,
    plugins: Iterable[Any] = (),
) -> dict:
    """Merge ``adapter`` into its base and save a plain transformers folder (with the tokenizer
    and chat template) at ``out``. A QLoRA adapter is merged into a full-precision copy of its base."""
    import torch

    from lft.adapters.merge import merge as merge_weights
    from lft.adapters.merge import save_model_folder

    loaded = load(model, {"merged": str(adapter)}, full_precision=True, plugins=plugins)
    merged = merge_weights(loaded.model)
    if dtype:
        merged = merged.to({"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype])
    path = save_model_folder(merged, loaded.tokenizer, out, overwrite=overwrite)
    return {
        "output": str(path),
        "base": loaded.label,
        "adapter": str(adapter),
        "trained_on": loaded.trained_quantization,
        "dtype": str(next(merged.parameters()).dtype).removeprefix("torch."),
    }

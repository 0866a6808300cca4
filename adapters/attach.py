"""Saved LoRA adapters on a base model: reading an adapter folder, checking that it fits the base
it is put on, and attaching several named adapters to one base."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from lft.errors import ModelError

ADAPTER_CONFIG = "adapter_config.json"
#: Config fields that must agree between the base an adapter was trained on and the model it is put on.
SIGNATURE = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size")
_PREFIX = "base_model.model."


def read_adapter(path: str | Path) -> dict:
    """The adapter's ``adapter_config.json``; a one-line error when ``path`` is not an adapter."""
    folder = Path(path).expanduser()
    if not folder.exists():
        raise ModelError(f"adapter folder {path} does not exist")
    if not (folder / ADAPTER_CONFIG).is_file():
        hint = " (it is a model folder: give it as --model)" if (folder / "config.json").is_file() else ""
        raise ModelError(f"{path} is not an adapter folder: it has no {ADAPTER_CONFIG}{hint}")
    try:
        return json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ModelError(f"{folder / ADAPTER_CONFIG}: invalid JSON ({exc.msg})") from None


def describe(config: Any) -> str:
    arch = (getattr(config, "architectures", None) or [getattr(config, "model_type", "?")])[0]
    return (
        f"{arch}, hidden {getattr(config, 'hidden_size', '?')}, {getattr(config, 'num_hidden_layers', '?')} "
        f"layers, vocab {getattr(config, 'vocab_size', '?')}"
    )


def _recorded_config(recorded: str | None) -> Any:
    """The config of the base an adapter records, when that base is a local folder."""
    if not recorded or not (Path(recorded).expanduser() / "config.json").is_file():
        return None
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(Path(recorded).expanduser())
    except Exception:  # an unreadable recorded base is no reason to refuse; the shapes are checked next
        return None


def _adapter_shapes(folder: Path) -> dict[str, tuple[int, int]]:
    """``{layer path: (in_features, out_features)}`` from the adapter's LoRA weight shapes."""
    from safetensors import safe_open

    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        raise ModelError(f"{folder} has no adapter_model.safetensors")
    shapes: dict[str, list[int | None]] = {}
    with safe_open(str(weights), framework="pt") as handle:
        for key in handle.keys():
            for part, index in ((".lora_A.", 0), (".lora_B.", 1)):
                if part in key and key.endswith(".weight"):
                    layer = key.split(part)[0].removeprefix(_PREFIX)
                    shape = handle.get_slice(key).get_shape()
                    entry = shapes.setdefault(layer, [None, None])
                    entry[index] = shape[1] if index == 0 else shape[0]
    return {k: (a, b) for k, (a, b) in shapes.items() if a is not None and b is not None}


def check_base(model: Any, path: str | Path, model_label: str) -> None:
    """Refuse an adapter that was trained on a different base than ``model``, naming both."""
    from lft.model.forward import unwrap

    folder = Path(path).expanduser()
    recorded = read_adapter(folder).get("base_model_name_or_path")
    base = unwrap(model)
    current = base.config
    trained_on = _recorded_config(recorded)
    if trained_on is not None:
        differ = [
            k
            for k in SIGNATURE
            if None not in (getattr(trained_on, k, None), getattr(current, k, None))
            and getattr(trained_on, k) != getattr(current, k)
        ]
        if differ:
            raise ModelError(
                f"adapter {path} was trained on {recorded} ({describe(trained_on)}) but the model is "
                f"{model_label} ({describe(current)}); give --model {recorded}"
            )
    for layer, (fan_in, fan_out) in _adapter_shapes(folder).items():
        try:
            module = base.get_submodule(layer)
        except AttributeError:
            raise ModelError(
                f"adapter {path} (trained on {recorded}) adapts layer {layer}, which the model "
                f"{model_label} ({describe(current)}) does not have"
            ) from None
        module = getattr(module, "base_layer", module)
        shape = (getattr(module, "in_features", fan_in), getattr(module, "out_features", fan_out))
        if shape != (fan_in, fan_out):
            raise ModelError(
                f"adapter {path} (trained on {recorded}) expects layer {layer} to map {fan_in} -> "
                f"{fan_out} features, but in the model {model_label} it maps {shape[0]} -> {shape[1]}"
            )


def attach(model: Any, adapters: Mapping[str, str | Path], model_label: str) -> Any:
    """Put every named adapter on ``model`` (checked first); returns a ``peft.PeftModel`` in eval mode."""
    from peft import PeftModel

    wrapped = None
    for name, path in adapters.items():
        check_base(wrapped if wrapped is not None else model, path, model_label)
        if wrapped is None:
            wrapped = PeftModel.from_pretrained(model, str(Path(path).expanduser()), adapter_name=name)
        else:
            wrapped.load_adapter(str(Path(path).expanduser()), adapter_name=name)
    if wrapped is None:
        raise ModelError("no adapter given")
    wrapped.eval()
    return wrapped

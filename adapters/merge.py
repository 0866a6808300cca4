"""Merging a LoRA adapter into its base weights (W + scale * B A becomes the new W) and writing
the result as a plain transformers model folder, atomically."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from lft.errors import ModelError


def merge(peft_model: Any) -> Any:
    """The base model with every LoRA update folded into its weights (no peft layers left).

    The base must be in full precision: folding an update into 4-bit weights would round it
    away, so a QLoRA adapter is merged into a full-precision copy of its base.
    """
    from lft.adapters.quantize import count_quantized

    if count_quantized(peft_model, 4) or count_quantized(peft_model, 8):
        raise ModelError("cannot merge into a quantized base; load the base in full precision first")
    merged = peft_model.merge_and_unload()
    for param in merged.parameters():
        param.requires_grad_(False)
    return merged


def save_model_folder(model: Any, tokenizer: Any, out: str | Path, overwrite: bool = False) -> Path:
    """Save ``model`` and ``tokenizer`` (with its chat template) into ``out`` as safetensors.

    Written into a temporary folder beside ``out`` and renamed into place, so ``out`` is either
    the complete folder or absent. An existing non-empty ``out`` is replaced only with ``overwrite``.
    """
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ModelError(f"output {out} already exists; pass --overwrite to replace it or choose another -o")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out

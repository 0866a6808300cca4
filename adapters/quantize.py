"""bitsandbytes quantization of a base model: the load-time config, the checks that the layers
really were quantized, the CPU repacking guard, and preparation for k-bit training."""

from __future__ import annotations

import warnings
from typing import Any

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def bnb_config(bits: int, quant_type: str = "nf4", double_quant: bool = True, compute_dtype: str = "float32") -> Any:
    """A ``BitsAndBytesConfig``: 4-bit (NF4 or FP4, optionally double-quantized constants,
    matmuls in ``compute_dtype``) or 8-bit (LLM.int8)."""
    from transformers import BitsAndBytesConfig

    if bits == 8:
        warnings.filterwarnings("ignore", message=r".*MatMul8bitLt: inputs will be cast.*")
        return BitsAndBytesConfig(load_in_8bit=True)
    if bits != 4:
        raise ValueError(f"bitsandbytes quantizes to 4 or 8 bits, not {bits}")
    _note_cpu_kernel()
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=_DTYPES[compute_dtype],
    )


def _note_cpu_kernel() -> None:
    """On a CPU with AVX512-BF16, bitsandbytes' fast 4-bit matmul comes from the optional
    ``kernels`` package; say so once when a run quantizes without it (lft drops bitsandbytes' own
    warning, which every run printed)."""
    import importlib.util
    import logging

    if torch.cuda.is_available() or importlib.util.find_spec("kernels") is not None:
        return
    if getattr(torch.backends.cpu, "get_cpu_capability", lambda: "")() not in ("AVX512", "AMX"):
        return
    logging.getLogger("lft").warning(
        "note: bitsandbytes' fast CPU 4-bit matmul needs the kernels package (pip install kernels); "
        "without it 4-bit layers take its slower path"
    )


def quantized_layer_types(bits: int) -> tuple[type, ...]:
    import bitsandbytes as bnb

    return (bnb.nn.Linear4bit,) if bits == 4 else (bnb.nn.Linear8bitLt,)


def count_quantized(model: Any, bits: int) -> int:
    """How many layers of ``model`` are bitsandbytes ``bits``-bit layers."""
    types = quantized_layer_types(bits)
    return sum(isinstance(m, types) for m in model.modules())


def already_quantized(model_config: Any) -> str | None:
    """The quantization method a checkpoint was saved with (gptq, awq, fp8, ...), or None."""
    qc = getattr(model_config, "quantization_config", None)
    if qc is None:
        return None
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    return str(getattr(method, "value", method) or "unknown")


def guard_cpu_repack(model: Any) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference; returns the layers guarded.

    On CPUs with AVX512-BF16, ``Linear4bit.forward`` in eval mode without gradients converts its
    weight, in place and for good, to a packed inference layout whose matmul has no backward.
    Every later training step then gets missing or wrong gradients, silently. An evaluation
    pass before or during training (the engine's "before" measurement, Lightning's validation)
    is exactly such a forward. Clearing the per-layer flag keeps the trainable layout.
    """
    import bitsandbytes as bnb

    guarded = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
            guarded += 1
    return guarded


def prepare_for_training(model: Any) -> Any:
    """Freeze the quantized base and make its inputs carry gradients to the adapters
    (peft's ``prepare_model_for_kbit_training``; gradient checkpointing is left to the wrapper)."""
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def memory_bytes(model: Any) -> int:
    """Bytes held by the model's parameters and buffers (4-bit weights count as stored)."""
    return (
        int(model.get_memory_footprint())
        if hasattr(model, "get_memory_footprint")
        else sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    )

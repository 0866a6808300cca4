"""LoRA adapters through peft."""

from __future__ import annotations

from typing import Any, Literal, Sequence

import torch

# Attention projection names across common architectures (Llama/Mistral/Qwen, GPT-2, Falcon, Phi, GPT-NeoX).
ATTENTION_NAMES = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "c_attn",
    "query_key_value",
    "Wqkv",
    "qkv_proj",
    "out_proj",
    "dense",
)


def _linear_types() -> tuple[type, ...]:
    types: list[type] = [torch.nn.Linear]
    try:
        from transformers.pytorch_utils import Conv1D

        types.append(Conv1D)
    except ImportError:
        pass
    try:
        import bitsandbytes as bnb

        types += [bnb.nn.Linear4bit, bnb.nn.Linear8bitLt]
    except Exception:
        pass
    return tuple(types)


def attention_modules(model: Any) -> list[str]:
    """Short names of the linear layers inside attention blocks (e.g. q_proj, k_proj, v_proj, o_proj)."""
    linear = _linear_types()
    found: list[str] = []
    for name, module in model.named_modules():
        parts = name.split(".")
        if isinstance(module, linear) and any("attn" in p.lower() or "attention" in p.lower() for p in parts[:-1]):
            if parts[-1] not in found:
                found.append(parts[-1])
    return found


def resolve_targets(model: Any, targets: str | Sequence[str]) -> str | list[str]:
    """``attention`` (the attention projections), ``all-linear``, or an explicit list of names."""
    if isinstance(targets, str):
        if targets == "all-linear":
            return "all-linear"
        if targets == "attention":
            found = attention_modules(model)
            if not found:
                raise ValueError("no attention projection layers found; give lora.target_modules explicitly")
            return found
        return [targets]
    names = list(targets)
    present = {n.split(".")[-1] for n, _ in model.named_modules()}
    missing = [t for t in names if t not in present and not any(n.endswith(t) for n, _ in model.named_modules())]
    if missing:
        sample = sorted({n for n in present if n and not n.isdigit()})[:12]
        raise ValueError(
            f"lora.target_modules {missing} match no layer of this model; layer names include {', '.join(sample)}"
        )
    return names


def apply_lora(
    model: Any,
    r: int,
    alpha: float,
    dropout: float,
    targets: str | Sequence[str],
    bias: Literal["none", "all", "lora_only"] = "none",
    use_rslora: bool = False,
    modules_to_save: Sequence[str] | None = None,
    task_type: str | None = "CAUSAL_LM",
) -> Any:
    """Freeze ``model`` and add trainable LoRA adapters to ``targets``; returns a ``PeftModel``.
    ``task_type=None`` suits a bare transformer body (no LM head), such as a critic's."""
    from peft import LoraConfig, get_peft_model

    lora_config = LoraConfig(
        r=r,
        lora_alpha=alpha,  # type: ignore[arg-type]  # peft annotates it int; a float works (scale alpha / r)
        lora_dropout=dropout,
        target_modules=resolve_targets(model, targets),
        bias=bias,
        use_rslora=use_rslora,
        modules_to_save=list(modules_to_save) if modules_to_save else None,
        task_type=task_type,
    )
    return get_peft_model(model, lora_config)


class FrozenLowPrecisionLinear(torch.nn.Linear):
    """A frozen ``nn.Linear`` whose weights are stored in a 16-bit dtype. Under autocast it is an
    ordinary linear layer (autocast would have cast the float32 weights to that dtype for every
    matmul anyway); outside autocast it casts its input to the weight dtype and its output back,
    so generation and evaluation work with or without autocast."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.weight.dtype or torch.is_autocast_enabled(x.device.type):
            return super().forward(x)
        return torch.nn.functional.linear(x.to(self.weight.dtype), self.weight, self.bias).to(x.dtype)


def store_frozen_linears(model: Any, dtype: torch.dtype) -> int:
    """Store the weights of ``model``'s frozen float32 ``nn.Linear`` layers in ``dtype``, except the
    output projection (often tied to the input embeddings, which autocast keeps in float32).
    Halves the memory of the frozen base under bf16 autocast, where every matmul already runs in
    bf16, and spares each step a cast of every weight (frozen weights are not in autocast's cache).
    Returns the number of parameters converted."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    converted = 0
    for module in model.modules():
        if type(module) is not torch.nn.Linear or module is output:
            continue
        params = [p for p in (module.weight, module.bias) if p is not None]
        if any(p.requires_grad or p.dtype != torch.float32 for p in params):
            continue
        module.to(dtype)
        module.__class__ = FrozenLowPrecisionLinear
        converted += sum(p.numel() for p in params)
    if converted:
        # The loader may have memory-mapped the checkpoint, and any tensor still viewing the mapping
        # keeps all of it resident: give the remaining ones memory of their own so it is released.
        with torch.no_grad():
            for tensor in [*model.parameters(), *model.buffers()]:
                if tensor.device.type == "cpu" and tensor.dtype != dtype:
                    tensor.data = tensor.data.clone()
    return converted

"""LoRA folded for sampling: while generating, each LoRA layer runs as one linear layer whose weight
is its base plus its adapters' update, one matmul per layer instead of three."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch


def _lora_layers(model: Any) -> list | None:
    """The LoRA linear layers whose adapters can be folded into a float32 base weight, or None
    when any adapter cannot (a variant such as DoRA, an adapter bias, a low-precision base)."""
    layers = []
    for module in model.modules():
        if not (
            hasattr(module, "get_delta_weight") and hasattr(module, "lora_A") and hasattr(module, "get_base_layer")
        ):
            continue
        active = [a for a in module.active_adapters if a in module.lora_A]
        if getattr(module, "disable_adapters", False):
            return None  # sampling the base (a reference): nothing to fold
        if not active or module.merged:
            continue
        if any(a in getattr(module, "lora_variant", {}) or getattr(module, "lora_bias", {}).get(a) for a in active):
            return None
        base = module.get_base_layer()
        if type(base) is not torch.nn.Linear or base.weight.dtype != torch.float32:
            return None  # a 16-bit base: the small update would round away in 16 bits
        layers.append((module, base, active))
    return layers


@contextlib.contextmanager
def low_precision_head(model: Any, dtype: torch.dtype | None) -> Iterator[bool]:
    """For the duration, the output projection's weight is a ``dtype`` copy: under autocast to
    ``dtype`` (``dtype`` given), the same values autocast would cast it to at every decoding step
    (it is float32 when tied to the input embeddings), cast once. Yields whether it swapped."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if dtype is None or type(head) is not torch.nn.Linear or head.weight.dtype != torch.float32:
        yield False
        return
    weight = head.weight
    head.weight = torch.nn.Parameter(weight.detach().to(dtype), requires_grad=False)
    try:
        yield True
    finally:
        head.weight = weight


@contextlib.contextmanager
def sampling_weights(model: Any, autocast_dtype: torch.dtype | None = None) -> Iterator[bool]:
    """For the duration, every LoRA layer runs as one linear layer whose weight is its base plus
    its adapters' update (``W + s B A``): generation then costs one matmul per layer instead of
    three, with the same function up to float32 rounding. The base weights themselves are not
    touched (the folded weights are new tensors), so nothing drifts. Under autocast
    (``autocast_dtype``) the output projection is cast once (``low_precision_head``). Yields
    whether it folded."""
    with low_precision_head(model, autocast_dtype):
        with _folded(model) as folded:
            yield folded


@contextlib.contextmanager
def _folded(model: Any) -> Iterator[bool]:
    disable = getattr(model, "disable_adapter", None)
    layers = _lora_layers(model) if callable(disable) else None
    if not layers or disable is None:  # layers are only looked for when disable_adapter is callable
        yield False
        return
    originals = []
    try:
        with torch.no_grad():
            for module, base, active in layers:
                folded = base.weight.detach().clone()
                for name in active:
                    folded += module.get_delta_weight(name).to(folded.dtype)
                originals.append((base, base.weight))
                base.weight = torch.nn.Parameter(folded, requires_grad=False)
        with disable():
            yield True
    finally:
        for base, weight in originals:
            base.weight = weight

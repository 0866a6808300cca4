"""Attention over packed rows, one example at a time: the ``lft_sdpa`` attention implementation.

A packed row (``lft.data.packing``) holds several examples whose position ids restart at each;
each example attends causally to itself only. transformers' SDPA path builds a (T x T) block
-diagonal mask for such a row, attends over every pair of tokens of the row, and keeps the mask,
cast to the activations' dtype, for the backward pass of every layer. ``lft_sdpa`` instead cuts
the row at its example boundaries and runs causal SDPA on each example: the same values and
gradients, a cost of ``sum(n_i^2)`` instead of ``T^2``, and no mask at all.

It applies where a batch is passed with ``position_ids`` and without an attention mask, and the
query and key lengths are equal (no cache): the packed and padding-free batches of training.
Every other call (a padded batch with its mask, generation with a cache) is transformers' own SDPA
attention, unchanged. ``use_segment_attention`` switches a model to it where that is exact: a
model on the ``sdpa`` implementation whose layers all attend causally over the full sequence (no
sliding window, no logit soft-capping).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

NAME = "lft_sdpa"

_last: tuple[Any, list[list[tuple[int, int]]]] = (None, [])  # (position_ids, their segments)


def segments(position_ids: torch.Tensor, batch: int) -> list[list[tuple[int, int]]]:
    """Per row, the ``(start, end)`` of each run of consecutive positions (an example)."""
    global _last
    if _last[0] is position_ids:  # every layer of a forward pass reads the same position ids
        return _last[1]
    pos = position_ids.expand(batch, -1) if position_ids.shape[0] != batch else position_ids
    starts = torch.ones_like(pos, dtype=torch.bool)
    starts[:, 1:] = pos[:, 1:] - pos[:, :-1] != 1
    length = pos.shape[1]
    rows = []
    for row in starts.tolist():
        cuts = [i for i, s in enumerate(row) if s] + [length]
        rows.append(list(zip(cuts[:-1], cuts[1:])))
    _last = (position_ids, rows)
    return rows


def segment_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """An attention function for transformers' ``AttentionInterface``; see the module docstring."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward, use_gqa_in_sdpa

    position_ids = kwargs.get("position_ids")
    if attention_mask is not None or position_ids is None or query.shape[2] != key.shape[2] or dropout:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    gqa = groups > 1 and use_gqa_in_sdpa(None, key, value)
    if groups > 1 and not gqa:
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    rows = []
    for b, cuts in enumerate(segments(position_ids, query.shape[0])):
        parts = [
            F.scaled_dot_product_attention(
                query[b : b + 1, :, s:e],
                key[b : b + 1, :, s:e],
                value[b : b + 1, :, s:e],
                is_causal=True,
                scale=scaling,
                enable_gqa=gqa,
            )
            for s, e in cuts
        ]
        rows.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=2))
    out = rows[0] if len(rows) == 1 else torch.cat(rows, dim=0)
    return out.transpose(1, 2).contiguous(), None


def segment_mask(**kwargs: Any) -> torch.Tensor | None:
    """The mask for ``lft_sdpa``: none for a batch without an attention mask and without a cache
    (``segment_attention`` then reads the examples from the position ids), SDPA's otherwise."""
    from transformers.masking_utils import sdpa_mask

    if kwargs.get("attention_mask") is None and kwargs.get("q_length") == kwargs.get("kv_length"):
        return None
    return sdpa_mask(**kwargs)


def register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, segment_attention)
    AttentionMaskInterface.register(NAME, segment_mask)


def _configs(model: Any) -> list[Any]:
    seen, out = set(), []
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and id(config) not in seen and hasattr(config, "_attn_implementation"):
            seen.add(id(config))
            out.append(config)
    return out


def _exact_for(config: Any) -> bool:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(text, "_attn_implementation", None) != "sdpa" or not getattr(text, "is_causal", True):
        return False
    if getattr(text, "sliding_window", None) and getattr(text, "use_sliding_window", True):
        return False
    if any(getattr(text, a, None) for a in ("attn_logit_softcapping", "final_logit_softcapping")):
        return False
    return all(t == "full_attention" for t in getattr(text, "layer_types", None) or ["full_attention"])


def use_segment_attention(model: Any) -> bool:
    """Switch ``model`` to ``lft_sdpa`` where it is exact (see the module docstring); returns
    whether it did."""
    configs = _configs(model)
    if not configs or not all(_exact_for(c) for c in configs):
        return False
    register()
    for config in configs:
        config._attn_implementation = NAME
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        text._attn_implementation = NAME
    return True


def use_sdpa(model: Any) -> None:
    """Undo ``use_segment_attention`` (the saved model names the stock implementation)."""
    for config in _configs(model):
        if config._attn_implementation == NAME:
            config._attn_implementation = "sdpa"
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        if getattr(text, "_attn_implementation", None) == NAME:
            text._attn_implementation = "sdpa"

"""Model plumbing shared by objectives: hidden states, the output projection, and per-token
log-probs computed in chunks (see ``lft.losses.logprobs``)."""

from __future__ import annotations

from typing import Any

import torch

from lft.losses.logprobs import entropy_from_logits, linear_entropy, logprobs_from_logits, shifted_logprobs

# Config attributes of models whose logits are more than ``lm_head(hidden)``.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def unwrap(model: Any) -> Any:
    """The transformers model under a peft wrapper (LoRA layers stay in place inside it)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def split_head(model: Any) -> tuple[Any, torch.nn.Module] | None:
    """``(backbone, lm_head)`` when logits are exactly ``lm_head(backbone(...).last_hidden_state)``."""
    base = unwrap(model)
    config = getattr(base, "config", None)
    if config is None or any(getattr(config, a, None) not in (None, 1, 1.0) for a in _LOGIT_TRANSFORMS):
        return None
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    backbone = base.get_decoder() if hasattr(base, "get_decoder") else None
    if backbone is None or backbone is base or type(head) is not torch.nn.Linear:
        return None
    return backbone, head


def token_logprobs(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, chunk: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of the labelled next tokens, shape (B, T-1), and their mask.

    Full-vocabulary logits are never formed for the whole batch when the model allows it.
    """
    parts = split_head(model)
    if parts is None:
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        return logprobs_from_logits(logits, labels)
    backbone, head = parts
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    return shifted_logprobs(hidden, head.weight, labels, head.bias, chunk)


def parameter_count(param: torch.Tensor) -> int:
    """Weights in ``param``; a packed 4-bit tensor holds two per byte, its shape is in ``quant_state``."""
    shape = getattr(getattr(param, "quant_state", None), "shape", None)
    return int(torch.Size(shape).numel()) if shape is not None else param.numel()


def token_stats(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, chunk: int = 1024,
    temperature: float = 1.0, entropy: bool = False, hidden: bool = False, position_ids: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """``token_logprobs`` of the distribution at ``temperature``, from one forward pass, plus on
    request the entropy (no gradient) at each scored position and the final hidden states.
    ``position_ids`` number left-padded rows as generation did (see ``lft.rollout``).

    :return: ``{"logps", "mask"}`` of shape (B, T-1), ``"entropy"`` (B, T-1) when asked, and
        ``"hidden"`` (B, T, H) when asked (what an output head or a value head reads).
    """
    parts = split_head(model)
    if parts is None:
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                    output_hidden_states=hidden)
        logits = out.logits / temperature
        logps, mask = logprobs_from_logits(logits, labels)
        stats = {"logps": logps, "mask": mask}
        if entropy:
            stats["entropy"] = entropy_from_logits(logits[:, :-1].detach()) * mask
        if hidden:
            stats["hidden"] = out.hidden_states[-1]
        return stats
    backbone, head = parts
    states = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      use_cache=False).last_hidden_state
    scaled = states / temperature if temperature != 1.0 else states
    bias = head.bias / temperature if head.bias is not None and temperature != 1.0 else head.bias
    logps, mask = shifted_logprobs(scaled, head.weight, labels, bias, chunk)
    stats = {"logps": logps, "mask": mask}
    if entropy:
        values = linear_entropy(scaled[:, :-1][mask].detach(), head.weight, bias, chunk)
        stats["entropy"] = torch.zeros(mask.shape, dtype=values.dtype, device=values.device).masked_scatter(mask, values)
    if hidden:
        stats["hidden"] = states
    return stats


def trainable_parameters(model: Any) -> tuple[int, int]:
    trainable = sum(parameter_count(p) for p in model.parameters() if p.requires_grad)
    total = sum(parameter_count(p) for p in model.parameters())
    return trainable, total

"""Model plumbing shared by objectives: hidden states, the output projection, and per-token
log-probs computed in chunks (see ``lft.losses.logprobs``)."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

from lft.data.packing import drops_padding
from lft.losses.logprobs import IGNORE_INDEX, entropy_from_logits, logprobs_from_logits, shifted_logprobs

# Config attributes of models whose logits are more than ``lm_head(hidden)``.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


@contextlib.contextmanager
def eval_mode(model: Any, grad: bool = False) -> Iterator[Any]:
    """Eval mode (no dropout) and, unless ``grad``, no gradients, for the duration; the model's
    training mode is restored after, whatever happens inside. Yields the model."""
    was_training = model.training
    model.eval()
    try:
        with contextlib.nullcontext() if grad else torch.no_grad():
            yield model
    finally:
        model.train(was_training)


def unwrap(model: Any) -> Any:
    """The transformers model under a peft wrapper (LoRA layers stay in place inside it)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def split_head(model: Any) -> tuple[Any, torch.nn.Linear] | None:
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


class Unpadded:
    """A padded batch as one padding-free row: the real tokens of every row, row after row, with
    position ids counted from 0 in each (as ``positions_of`` numbers them), so that each row
    attends to itself only (``lft.model.attention``). ``back`` and ``back_shifted`` put per-token
    results of the row where the padded batch has them, zeros at the padding."""

    def __init__(self, attention_mask: torch.Tensor):
        self.shape = attention_mask.shape
        keep = attention_mask.reshape(-1).bool()
        self.index = keep.nonzero().squeeze(-1)  # where each real token sits in the flattened batch
        lengths = attention_mask.bool().sum(-1)
        self.starts = lengths.cumsum(0) - lengths  # each row's first token in the padding-free row
        self.position_ids = positions_of(attention_mask).reshape(-1)[self.index][None]

    def flat(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.reshape(-1, *tensor.shape[2:])[self.index][None]

    def labels(self, labels: torch.Tensor) -> torch.Tensor:
        """The row's labels, each row's first masked: no row is scored from the one before it."""
        flat = self.flat(labels).clone()
        flat[0, self.starts[self.starts < flat.shape[1]]] = IGNORE_INDEX
        return flat

    def back(self, values: torch.Tensor) -> torch.Tensor:
        """(1, N, ...) per real token -> (B, T, ...) of the padded batch."""
        out = values.new_zeros((self.shape[0] * self.shape[1], *values.shape[2:]))
        return out.index_copy(0, self.index, values[0]).reshape(*self.shape, *values.shape[2:])

    def back_shifted(self, values: torch.Tensor) -> torch.Tensor:
        """(1, N-1) next-token values (value j predicts token j + 1) -> (B, T-1), likewise."""
        out = values.new_zeros(self.shape[0] * self.shape[1])
        out = out.index_copy(0, self.index[1:], values[0]).reshape(self.shape)
        return out[:, 1:]


def token_logprobs(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor,
    chunk: int = 1024,
    position_ids: torch.Tensor | None = None,
    padding_free: bool | str = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of the labelled next tokens, shape (B, T-1), and their mask.

    With ``position_ids`` (packed rows, positions restarting at each example) no attention mask
    is passed, so that the model attends within each example only (``lft.data.packing``).
    ``padding_free`` runs a padded batch as one row without its padding (``Unpadded``); the
    result is the padded batch's, within float tolerance.
    Full-vocabulary logits are never formed for the whole batch when the model allows it.
    """
    if attention_mask is not None and position_ids is None and drops_padding(padding_free, attention_mask):
        row = Unpadded(attention_mask)
        logps, mask = token_logprobs(
            model, row.flat(input_ids), None, row.labels(labels), chunk, position_ids=row.position_ids
        )
        return row.back_shifted(logps), row.back_shifted(mask)
    inputs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
    if position_ids is not None:
        inputs = {"input_ids": input_ids, "position_ids": position_ids}
    parts = split_head(model)
    if parts is None:
        logits = model(**inputs).logits
        return logprobs_from_logits(logits, labels)
    backbone, head = parts
    hidden = backbone(**inputs, use_cache=False).last_hidden_state
    return shifted_logprobs(hidden, head.weight, labels, head.bias, chunk)


def parameter_count(param: torch.Tensor) -> int:
    """Weights in ``param``; a packed 4-bit tensor holds two per byte, its shape is in ``quant_state``."""
    shape = getattr(getattr(param, "quant_state", None), "shape", None)
    return int(torch.Size(shape).numel()) if shape is not None else param.numel()


def token_stats(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    chunk: int = 1024,
    temperature: float = 1.0,
    entropy: bool = False,
    hidden: bool = False,
    position_ids: torch.Tensor | None = None,
    padding_free: bool | str = False,
) -> dict[str, torch.Tensor]:
    """``token_logprobs`` of the distribution at ``temperature``, from one forward pass, plus on
    request the entropy (no gradient) at each scored position and the final hidden states.
    ``position_ids`` number left-padded rows as generation did (see ``lft.online.rollout``);
    ``padding_free`` runs the rows as one row without their padding (see ``token_logprobs``).

    :return: ``{"logps", "mask"}`` of shape (B, T-1), ``"entropy"`` (B, T-1) when asked, and
        ``"hidden"`` (B, T, H) when asked (what an output head or a value head reads).
    """
    if drops_padding(padding_free, attention_mask):
        row = Unpadded(attention_mask)
        flat = token_stats(
            model,
            row.flat(input_ids),
            None,  # type: ignore[arg-type]  # the row has no padding: the positions say where rows start
            row.labels(labels),
            chunk,
            temperature,
            entropy,
            hidden,
            position_ids=row.position_ids,
        )
        return {k: row.back(v) if k == "hidden" else row.back_shifted(v) for k, v in flat.items()}
    parts = split_head(model)
    if parts is None:
        out = model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, output_hidden_states=hidden
        )
        logits = out.logits / temperature
        logps, mask = logprobs_from_logits(logits, labels)
        stats = {"logps": logps, "mask": mask}
        if entropy:
            stats["entropy"] = entropy_from_logits(logits[:, :-1].detach()) * mask
        if hidden:
            stats["hidden"] = out.hidden_states[-1]
        return stats
    backbone, head = parts
    states = backbone(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    ).last_hidden_state
    stats = _head_stats(states, head, labels, chunk, temperature, entropy)
    if hidden:
        stats["hidden"] = states
    return stats


def _head_stats(
    states: torch.Tensor, head: torch.nn.Linear, labels: torch.Tensor, chunk: int, temperature: float, entropy: bool
) -> dict[str, torch.Tensor]:
    """``logps``, ``mask`` (and ``entropy``) of the labelled next tokens, from final hidden states."""
    scaled = states / temperature if temperature != 1.0 else states
    bias = head.bias / temperature if head.bias is not None and temperature != 1.0 else head.bias
    return dict(zip(("logps", "mask", "entropy"), shifted_logprobs(scaled, head.weight, labels, bias, chunk, entropy)))


def positions_of(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that count only real tokens, as ``generate`` numbers left-padded rows."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def trainable_parameters(model: Any) -> tuple[int, int]:
    trainable = sum(parameter_count(p) for p in model.parameters() if p.requires_grad)
    total = sum(parameter_count(p) for p in model.parameters())
    return trainable, total


def completion_stats(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    prompt_length: int,
    chunk: int = 1024,
    temperature: float = 1.0,
    entropy: bool = False,
    hidden: bool = False,
    position_ids: torch.Tensor | None = None,
    groups: torch.Tensor | None = None,
    padding_free: bool | str = False,
) -> dict[str, torch.Tensor]:
    """``token_stats`` of the completion tokens of prompt + completion rows: ``"logps"``,
    ``"mask"`` (and ``"entropy"``) of shape (B, C) for the ``C = T - prompt_length`` completion
    tokens, and ``"hidden"`` (B, C, H), the state each completion token is predicted from.

    ``groups`` (B,) names each row's prompt: rows with the same group hold the same first
    ``prompt_length`` tokens and mask (the samples of one prompt in a rollout). The prompt is
    then encoded once per group, with gradient, and its keys and values shared by the group's
    rows, which encode only their completions; the result is the same as encoding every row
    whole. With ``G`` samples per prompt this saves ``(G - 1) / G`` of the prompt's compute.
    ``padding_free`` instead runs every row whole, all of them as one row without padding.
    """
    start = prompt_length - 1
    padding_free = drops_padding(padding_free, attention_mask)
    parts = split_head(model)
    shared = (
        parts is not None
        and not padding_free
        and groups is not None
        and prompt_length > 1
        and input_ids.shape[1] > prompt_length
        and not any(getattr(m, "gradient_checkpointing", False) for m in parts[0].modules())
    )
    if shared and groups is not None:
        heads, inverse = torch.unique(groups, return_inverse=True)
        shared = heads.numel() < groups.numel()
    if not shared or parts is None or groups is None:  # shared implies both: the checks only narrow the types
        stats = token_stats(
            model,
            input_ids,
            attention_mask,
            labels,
            chunk,
            temperature,
            entropy=entropy,
            hidden=hidden,
            position_ids=position_ids,
            padding_free=padding_free,
        )
        out: dict[str, torch.Tensor] = {
            key: stats[key][:, start:] for key in ("logps", "mask", "entropy") if key in stats
        }
        if hidden:
            out["hidden"] = stats["hidden"][:, start:-1]
        return out
    backbone, head = parts
    if position_ids is None:
        position_ids = positions_of(attention_mask)
    rows = torch.arange(groups.numel(), device=groups.device)
    first = torch.full((heads.numel(),), groups.numel(), dtype=rows.dtype, device=rows.device)
    first = first.scatter_reduce(0, inverse, rows, reduce="amin")  # one row per prompt
    prefix = backbone(
        input_ids=input_ids[first, :prompt_length],
        attention_mask=attention_mask[first, :prompt_length],
        position_ids=position_ids[first, :prompt_length],
        use_cache=True,
    )
    name = "cache" if prefix.get("cache") is not None else "past_key_values"  # transformers 5 renamed it
    cache = prefix[name]
    cache.reorder_cache(inverse)  # differentiable: each row reads its prompt's keys and values
    rest = backbone(
        input_ids=input_ids[:, prompt_length:],
        attention_mask=attention_mask,
        position_ids=position_ids[:, prompt_length:],
        use_cache=True,
        **{name: cache},
    )
    states = torch.cat([prefix.last_hidden_state[:, -1:].index_select(0, inverse), rest.last_hidden_state], dim=1)
    out = _head_stats(states, head, labels[:, start:], chunk, temperature, entropy)
    if hidden:
        out["hidden"] = states[:, :-1]
    return out

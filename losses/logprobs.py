"""Per-token log-probabilities without materialising full-vocabulary logits for the batch.

``linear_logprobs(hidden, weight, targets)`` returns ``log softmax(hidden @ weight.T)[target]``
for each row, computing the vocabulary projection ``chunk`` rows at a time. Its backward pass
never keeps a ``(rows, vocab)`` tensor either:

* when the output projection is frozen (LoRA, QLoRA), the gradient with respect to ``hidden`` is
  computed chunk by chunk during the forward pass, where the probabilities already exist; the
  backward pass only scales it by the incoming gradient, one number per row;
* when the projection is trained (full fine-tuning), each chunk's logits are recomputed in the
  backward pass to form both gradients.

The gradient of ``log p(y)`` with respect to the logits is ``onehot(y) - softmax(logits)``.
Matmuls run in the autocast dtype when autocast is on; softmax is always in float32.
"""

from __future__ import annotations

from typing import Any

import torch

#: The label of a token that is not trained (prompt, padding): the index torch's losses skip.
IGNORE_INDEX = -100


def _compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    device = tensor.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return tensor.dtype


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    logits = h.to(dtype) @ weight.to(dtype).t()
    if bias is not None:
        logits = logits + bias.to(dtype)
    return logits.to(_accumulate(dtype))


def _accumulate(dtype: torch.dtype) -> torch.dtype:
    """float32, or float64 for float64 inputs: softmax and sums never run in half precision."""
    return torch.promote_types(dtype, torch.float32)


class _LinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk, want_entropy=False):
        dtype = _compute_dtype(hidden)
        need_h, need_w = (
            ctx.needs_input_grad[0],
            ctx.needs_input_grad[1] or (bias is not None and ctx.needs_input_grad[2]),
        )
        out = torch.empty(hidden.shape[0], dtype=_accumulate(hidden.dtype), device=hidden.device)
        precomputed = need_h and not need_w
        grad_hidden = torch.empty_like(hidden) if precomputed else None
        entropy = torch.empty(hidden.shape[0] if want_entropy else 0, dtype=out.dtype, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            cast = weight.to(dtype)  # once, not per chunk
            for start in range(0, hidden.shape[0], chunk):
                end = min(start + chunk, hidden.shape[0])
                logits = _chunk_logits(hidden[start:end], cast, bias, dtype)
                rows = torch.arange(end - start, device=hidden.device)
                tgt = targets[start:end]
                lse = torch.logsumexp(logits, dim=-1)
                out[start:end] = logits[rows, tgt] - lse
                if want_entropy:  # from the logits already here, rather than a second projection
                    logp = logits.sub_(lse[:, None])
                    probs = logp.exp()
                    entropy[start:end] = -(probs * logp).sum(-1)
                    logits = probs
                if precomputed:
                    # in place: one (rows, vocab) buffer
                    grad_logits = (logits if want_entropy else logits.sub_(lse[:, None]).exp_()).neg_()
                    grad_logits[rows, tgt] += 1.0
                    grad_hidden[start:end] = (grad_logits.to(dtype) @ cast).to(hidden.dtype)
        ctx.chunk, ctx.dtype, ctx.precomputed = chunk, dtype, precomputed
        ctx.has_bias = bias is not None
        if precomputed:
            ctx.save_for_backward(grad_hidden)
        elif need_h or need_w:
            ctx.save_for_backward(hidden, weight, bias if bias is not None else torch.empty(0), targets)
        ctx.mark_non_differentiable(entropy)
        return out, entropy

    @staticmethod
    def backward(ctx, grad_out, grad_entropy):
        if ctx.precomputed:
            (grad_hidden,) = ctx.saved_tensors
            return grad_hidden * grad_out[:, None].to(grad_hidden.dtype), None, None, None, None, None
        hidden, weight, bias, targets = ctx.saved_tensors
        bias = bias if ctx.has_bias else None
        dtype = ctx.dtype
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        acc = _accumulate(weight.dtype)
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if ctx.needs_input_grad[1] else None
        grad_bias = (
            torch.zeros(bias.shape, dtype=acc, device=bias.device)
            if bias is not None and ctx.needs_input_grad[2]
            else None
        )
        cast = weight.to(dtype)
        for start in range(0, hidden.shape[0], ctx.chunk):
            end = min(start + ctx.chunk, hidden.shape[0])
            h = hidden[start:end]
            logits = _chunk_logits(h, cast, bias, dtype)
            rows = torch.arange(end - start, device=hidden.device)
            probs = torch.softmax(logits, dim=-1)
            grad_logits = probs.neg_()
            grad_logits[rows, targets[start:end]] += 1.0
            grad_logits.mul_(grad_out[start:end, None])
            if grad_hidden is not None:
                grad_hidden[start:end] = (grad_logits.to(dtype) @ cast).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight += grad_logits.t().to(acc) @ h.to(acc)
            if grad_bias is not None:
                grad_bias += grad_logits.sum(0).to(acc)
        return (
            grad_hidden,
            grad_weight.to(weight.dtype) if grad_weight is not None else None,
            grad_bias.to(bias.dtype) if grad_bias is not None else None,
            None,
            None,
            None,
        )


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    chunk: int = 1024,
    entropy: bool = False,
) -> Any:
    """``log_softmax(hidden @ weight.T + bias)[i, targets[i]]`` for rows ``hidden`` of shape (N, H).
    With ``entropy``, also the entropy of each row's distribution (no gradient), from the same
    logits: ``(logps, entropy)``."""
    if hidden.shape[0] == 0:
        empty = hidden.new_zeros(0, dtype=torch.float32) + 0 * hidden.sum()
        return (empty, empty.detach().clone()) if entropy else empty
    logps, ent = _LinearLogprobs.apply(hidden, weight, bias, targets, int(chunk), bool(entropy))
    return (logps, ent) if entropy else logps


def shifted_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    chunk: int = 1024,
    entropy: bool = False,
) -> Any:
    """Log-probs of next tokens for a causal LM.

    :param hidden: final hidden states, shape (B, T, H).
    :param labels: token ids with -100 on positions not scored, shape (B, T). Position t's
        hidden state predicts ``labels[:, t + 1]``.
    :return: ``(logps, mask)`` of shape (B, T - 1): the log-prob of each scored next token (0
        elsewhere) and a bool mask of scored positions. Only scored positions are projected
        onto the vocabulary. With ``entropy``, a third tensor (B, T - 1): the entropy (no gradient)
        at each scored position, 0 elsewhere.
    """
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    selected = hidden[:, :-1][mask]
    result = linear_logprobs(selected, weight, targets[mask], bias, chunk, entropy=entropy)
    values = result[0] if entropy else result
    logps = torch.zeros(targets.shape, dtype=values.dtype, device=values.device)
    logps = logps.masked_scatter(mask, values)
    if not entropy:
        return logps, mask
    return (
        logps,
        mask,
        torch.zeros(targets.shape, dtype=values.dtype, device=values.device).masked_scatter(mask, result[1]),
    )


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain computation over full logits (B, T, V), as a reference and a fallback."""
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    values = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return values * mask, mask


@torch.no_grad()
def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the softmax over the last dimension, in float32 (or float64 for float64)."""
    logp = torch.log_softmax(logits.to(_accumulate(logits.dtype)), dim=-1)
    return -(logp.exp() * logp).sum(-1)

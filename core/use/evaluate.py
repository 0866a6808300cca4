"""Evaluation shared by ``lft run`` (its before/after summary) and ``lft eval``, so that the two
report the same numbers for the same model and data.

What is measured comes from the plugins: the objective's own held-out loss and metrics
(``objective_loss``), and its ``measure`` of examples in its format, which does not depend on the
method that trained the model (a token NLL for SFT rows, which completion of a pair the model
prefers), so runs of different methods compare on the same data. This module gives them the
shared pieces (eval mode, batches, summed log-probs, autocast) and measures the embedded task.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch

from lft.data import chat, task
from lft.data.format import pad_collate
from lft.errors import ConfigError
from lft.model.forward import eval_mode, token_logprobs


@contextlib.contextmanager
def inference_mode(model: Any, tokenizer: Any = None) -> Iterator[None]:
    """``eval_mode`` with left padding for ``tokenizer`` (for generation), restored after."""
    side = tokenizer.padding_side if tokenizer is not None else None
    if tokenizer is not None:
        tokenizer.padding_side = "left"
    try:
        with eval_mode(model):
            yield
    finally:
        if tokenizer is not None:
            tokenizer.padding_side = side


def generate(
    model: Any,
    tokenizer: Any,
    prompts: Iterable[Any],
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    batch_size: int = 16,
    use_template: bool = True,
    streamer: Any = None,
) -> list[str]:
    """Complete each prompt (a string or a list of messages), batched with a KV cache.

    Strings go through the chat template when the tokenizer has one. Greedy when
    ``temperature`` is 0; sampling is reproducible with ``seed``. A transformers ``streamer``
    receives the tokens as they come (one prompt at a time).
    """
    texts = [chat.prompt_text(tokenizer, p, use_template) for p in prompts]
    if seed is not None:
        torch.manual_seed(seed)
    stop = sorted(chat.end_of_turn_ids(tokenizer))
    outputs: list[str] = []
    device = next(model.parameters()).device
    with inference_mode(model, tokenizer):
        for start in range(0, len(texts), batch_size):
            chunk = texts[start : start + batch_size]
            enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            kwargs: dict[str, Any] = {
                "max_new_tokens": max_new_tokens,
                "pad_token_id": tokenizer.pad_token_id,
                "eos_token_id": stop or None,
            }
            if streamer is not None:
                kwargs["streamer"] = streamer
            if temperature > 0:
                kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
            else:
                kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
            out = model.generate(**enc, **kwargs)
            new = out[:, enc["input_ids"].shape[1] :]
            outputs.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
    return outputs


def task_metric(model: Any, tokenizer: Any, rows: list[dict], max_new_tokens: int = 32, batch_size: int = 32) -> dict:
    """Exact-match accuracy of greedy answers on ``prompt``/``answer`` rows of the embedded task."""
    prompts = [r["prompt"] for r in rows]
    completions = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    scores = [task.score(c, r["answer"]) for c, r in zip(completions, rows)]
    return {
        "accuracy": sum(scores) / max(1, len(scores)),
        "n": len(scores),
        "samples": [
            {"prompt": p, "completion": c, "answer": r["answer"], "correct": bool(s)}
            for p, c, r, s in list(zip(prompts, completions, rows, scores))[:5]
        ],
    }


@dataclass
class Settings:
    """How held-out measurements are computed; ``from_config`` reads them from a RunConfig."""

    batch_size: int = 32
    max_new_tokens: int = 32
    precision: str = "32-true"
    chunk: int = 1024

    @classmethod
    def from_config(cls, config: Any) -> "Settings":
        return cls(
            batch_size=config.eval.batch_size,
            max_new_tokens=config.eval.max_new_tokens,
            precision=config.trainer.precision,
            chunk=config.trainer.logits_chunk,
        )


def autocast(precision: str, device: torch.device) -> Any:
    """bf16 autocast when the run trains in bf16, so measurements match the trained numerics."""
    if str(precision).startswith("bf16"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _autocast(module: Any) -> Any:
    """``autocast`` for a training module, from its run's precision."""
    return autocast(module.config.trainer.precision, module.device)


def objective_loss(module: Any, loader: Iterable[dict]) -> dict:
    """The objective's own loss and metrics over a held-out loader: what the method optimises (a
    DPO loss and its implicit rewards, a reward model's pair accuracy, the reward of greedy
    completions for online methods). The loss is that of the whole set as one batch (each term
    weighted by the units it averages over, see ``lft.objective``); the metrics are weighted by
    batch size."""
    from lft.objective import HeldOutLoss, batch_rows, units_of

    totals: dict[str, float] = {}
    held_out = HeldOutLoss()
    seen = 0
    with eval_mode(module.model), _autocast(module):
        for batch in loader:
            batch = {k: v.to(module.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            loss, metrics = module.objective(module, batch)
            held_out.add(loss, units_of(module.objective, batch))
            size = batch_rows(batch)
            seen += size
            for key, value in (metrics or {}).items():
                totals[key] = totals.get(key, 0.0) + float(value) * size
    out = {k: v / max(1, seen) for k, v in totals.items()}
    total_loss = held_out.value()
    if total_loss is not None:
        out["loss"] = total_loss
    return out


def batches(
    model: Any, features: Sequence[Mapping[str, Any]], keys: tuple[str, ...], pad_id: int, batch_size: int
) -> Iterator[dict]:
    """Padded batches of ``keys`` of ``features``, on the model's device."""
    device = next(model.parameters()).device
    for start in range(0, len(features), batch_size):
        chunk = [{k: f[k] for k in keys} for f in features[start : start + batch_size]]
        yield {k: v.to(device) for k, v in pad_collate(chunk, pad_id).items()}


def sequence_logprobs(
    model: Any, batch: Mapping[str, Any], prefix: str, chunk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of the labelled tokens of each sequence ``{prefix}input_ids`` /
    ``{prefix}labels`` of ``batch``, and their counts."""
    logps, mask = token_logprobs(
        model, batch[f"{prefix}input_ids"], batch[f"{prefix}attention_mask"], batch[f"{prefix}labels"], chunk
    )
    mask = mask.to(logps.dtype)
    return (logps * mask).sum(-1).double(), mask.sum(-1).double()


def task_measure(model: Any, tokenizer: Any, rows: list[dict], settings: Settings) -> dict:
    """The embedded task's exact-match accuracy on its held-out prompt/answer rows."""
    metric = task_metric(model, tokenizer, rows, settings.max_new_tokens, settings.batch_size)
    return {"task_accuracy": metric["accuracy"], "task_samples": metric["samples"]}


def task_rows(eval_config: Any, data_spec: str | None) -> list[dict] | None:
    """The embedded task's held-out prompts to measure, per ``eval.task``: ``arith``, ``none``, or
    ``auto`` (arith when ``data_spec`` is embedded task data)."""
    setting = eval_config.task
    if setting in (None, "none", "") or eval_config.task_samples == 0:
        return None
    if setting == "auto" and not task.is_embedded(data_spec):
        return None
    if setting not in ("auto", "arith"):
        raise ConfigError(f"eval.task: unknown task {setting!r}; expected arith, auto or none")
    from lft.data.files import read_rows

    return read_rows(str(task.path("prompts", "eval"))).rows[: eval_config.task_samples]

"""Evaluation shared by ``lft run`` (before/after summary) and ``lft eval``: batched generation,
the task metric, and the objective's loss on held-out data."""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterable

import torch

from lft import chat, task


@contextlib.contextmanager
def inference_mode(model: Any, tokenizer: Any):
    """Eval mode, left padding and no gradients for the duration; everything restored after."""
    was_training = model.training
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        tokenizer.padding_side = side
        model.train(was_training)


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
) -> list[str]:
    """Complete each prompt (a string or a list of messages), batched with a KV cache.

    Strings go through the chat template when the tokenizer has one. Greedy when
    ``temperature`` is 0; sampling is reproducible with ``seed``.
    """
    texts = [chat.prompt_text(tokenizer, p, use_template) for p in prompts]
    if seed is not None:
        torch.manual_seed(seed)
    stop = sorted(chat.end_of_turn_ids(tokenizer))
    outputs: list[str] = []
    device = next(model.parameters()).device
    with inference_mode(model, tokenizer):
        for start in range(0, len(texts), batch_size):
            chunk = texts[start: start + batch_size]
            enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            kwargs: dict[str, Any] = {
                "max_new_tokens": max_new_tokens,
                "pad_token_id": tokenizer.pad_token_id,
                "eos_token_id": stop or None,
            }
            if temperature > 0:
                kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
            else:
                kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
            out = model.generate(**enc, **kwargs)
            new = out[:, enc["input_ids"].shape[1]:]
            outputs.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
    return outputs


def task_metric(model: Any, tokenizer: Any, rows: list[dict], max_new_tokens: int = 32,
                batch_size: int = 32) -> dict:
    """Exact-match accuracy of greedy answers on ``prompt``/``answer`` rows of the embedded task."""
    prompts = [r["prompt"] for r in rows]
    completions = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    scores = [task.score(c, r["answer"]) for c, r in zip(completions, rows)]
    return {
        "accuracy": sum(scores) / max(1, len(scores)),
        "n": len(scores),
        "samples": [{"prompt": p, "completion": c, "answer": r["answer"], "correct": bool(s)}
                    for p, c, r, s in list(zip(prompts, completions, rows, scores))[:5]],
    }


def objective_loss(module: Any, loader: Iterable[dict]) -> dict:
    """Mean objective loss (weighted by batch size) and its metrics over a held-out loader."""
    model = module.model
    totals: dict[str, float] = {}
    seen = 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _autocast(module):
            for batch in loader:
                batch = {k: v.to(module.device) if torch.is_tensor(v) else v for k, v in batch.items()}
                loss, metrics = module.compute(batch)
                size = next((int(v.shape[0]) for k, v in batch.items() if k.endswith("input_ids") and torch.is_tensor(v)), 1)
                seen += size
                totals["loss"] = totals.get("loss", 0.0) + float(loss) * size
                for key, value in metrics.items():
                    if "tokens" in key:  # counts, not quality metrics
                        continue
                    totals[key] = totals.get(key, 0.0) + float(value) * size
    finally:
        model.train(was_training)
    out = {k: v / max(1, seen) for k, v in totals.items()}
    if "nll" in out:  # objectives that report a token NLL get a perplexity
        out["perplexity"] = math.exp(min(out["nll"], 50.0))
    return out


def _autocast(module: Any):
    precision = str(getattr(getattr(module, "config", None), "trainer", None) and module.config.trainer.precision)
    if precision.startswith("bf16"):
        return torch.autocast(module.device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()

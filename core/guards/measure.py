"""Model measurements behind the end-of-run guards: sampled answers and their repetition, perplexity
on general text, and the KL from the base model estimated on the base model's own samples.

All of them run the same way before training (the base) and after it, so they compare like with
like. Sampling forks the RNG, so a guard never changes the training run's random stream.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch

from lft.data import chat
from lft.losses.logprobs import IGNORE_INDEX
from lft.model.forward import eval_mode, token_logprobs
from lft.use import evaluate


def prompt_prefixes(features: list[dict], limit: int) -> list[list[int]]:
    """The prompts of formatted examples: the tokens before the first trained label."""
    prompts = []
    for feature in features:
        ids = next((v for k, v in feature.items() if k.endswith("input_ids")), None)
        labels = next((v for k, v in feature.items() if k.endswith("labels")), None)
        if not isinstance(ids, list) or not isinstance(labels, list):
            continue
        first = next((i for i, t in enumerate(labels) if t != IGNORE_INDEX), None)
        if first:  # None: nothing trained; 0: no prompt
            prompts.append(list(ids[:first]))
        if len(prompts) >= limit:
            break
    return prompts


@contextlib.contextmanager
def _forked_rng(model: Any, seed: int):
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def sample(
    model: Any,
    tokenizer: Any,
    prompts: list[list[int]],
    max_new_tokens: int,
    temperature: float,
    seed: int,
    batch_size: int = 16,
) -> list[tuple[list[int], bool]]:
    """Sample one completion per prompt (token ids, left-padded batches; greedy at temperature 0).
    Returns each completion's ids, cut after the first end-of-turn token, and whether it stopped there."""
    stop = chat.end_of_turn_ids(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    out: list[tuple[list[int], bool]] = []
    with _forked_rng(model, seed), evaluate.inference_mode(model, tokenizer):
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            width = max(len(p) for p in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, p in enumerate(chunk):
                ids[i, width - len(p) :] = torch.tensor(p)
                mask[i, width - len(p) :] = 1
            how = (
                dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
                if temperature > 0
                else dict(do_sample=False, temperature=None, top_k=None, top_p=None)
            )  # greedy
            generated = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                **how,
                max_new_tokens=max_new_tokens,
                eos_token_id=sorted(stop) or None,
                pad_token_id=pad,
            )
            for row in generated[:, width:].tolist():
                end = next((i for i, t in enumerate(row) if t in stop), None)
                out.append((row[: end + 1], True) if end is not None else (row, False))
    return out


def repetition_rate(ids: list[int], n: int = 3) -> float:
    """The fraction of a completion's token n-grams that repeat an earlier one: 0 for text that never
    repeats itself, close to 1 for a loop. ``[1, 2, 3, 1, 2, 3]`` has 4 trigrams, one repeated: 0.25."""
    grams = [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def generation_stats(samples: list[tuple[list[int], bool]], n: int = 3) -> dict:
    """Mean repetition rate, share of completions that never stopped, mean length."""
    if not samples:
        return {"repetition": 0.0, "no_stop": 0.0, "length": 0.0, "samples": 0}
    return {
        "repetition": sum(repetition_rate(s, n) for s, _ in samples) / len(samples),
        "no_stop": sum(not stopped for _, stopped in samples) / len(samples),
        "length": sum(len(s) for s, _ in samples) / len(samples),
        "samples": len(samples),
    }


def _batched_logprobs(
    module: Any, sequences: list[tuple[list[int], int]], batch_size: int = 8
) -> list[tuple[float, int]]:
    """``(sum of log-probs, token count)`` of each sequence's tokens from position ``start`` on."""
    model, config = module.model, module.config
    pad = module.tokenizer.pad_token_id or 0
    chunk = config.trainer.logits_chunk
    results: list[tuple[float, int]] = []
    with eval_mode(model), evaluate._autocast(module):
        for start in range(0, len(sequences), batch_size):
            part = sequences[start : start + batch_size]
            width = max(len(s) for s, _ in part)
            ids = torch.full((len(part), width), pad, dtype=torch.long)
            labels = torch.full((len(part), width), IGNORE_INDEX, dtype=torch.long)
            mask = torch.zeros((len(part), width), dtype=torch.long)
            for i, (seq, begin) in enumerate(part):
                ids[i, : len(seq)] = torch.tensor(seq)
                mask[i, : len(seq)] = 1
                labels[i, begin : len(seq)] = torch.tensor(seq[begin:])
            device = module.device
            logps, valid = token_logprobs(model, ids.to(device), mask.to(device), labels.to(device), chunk)
            sums = (logps.float() * valid).sum(-1).tolist()
            counts = valid.sum(-1).tolist()
            results.extend((float(lp), int(c)) for lp, c in zip(sums, counts))
    return results


def perplexity(module: Any, texts: list[str], max_tokens: int = 256) -> float:
    """Perplexity of the model on plain texts (every token after the first is scored)."""
    tokenizer = module.tokenizer
    sequences = [(list(tokenizer(t, add_special_tokens=True)["input_ids"])[:max_tokens], 1) for t in texts]
    scored = _batched_logprobs(module, [s for s in sequences if len(s[0]) > 1])
    tokens = sum(c for _, c in scored)
    return math.exp(min(50.0, -sum(lp for lp, _ in scored) / max(1, tokens)))


def completion_logprobs(module: Any, prompts: list[list[int]], completions: list[list[int]]) -> list[tuple[float, int]]:
    """Log-prob sum and length of each completion given its prompt."""
    return _batched_logprobs(module, [(p + c, len(p)) for p, c in zip(prompts, completions) if c])


def kl_per_token(base: list[tuple[float, int]], tuned: list[tuple[float, int]]) -> float:
    """KL(base || tuned) per token, estimated on completions sampled from the base at temperature 1:
    the mean over their tokens of log p_base - log p_tuned. E.g. two completions of 2 and 3 tokens
    with base log-probs -2, -3 and tuned -2.5, -3.5: ((−2+2.5) + (−3+3.5)) / 5 = 0.2 nats per token."""
    tokens = sum(c for _, c in base)
    return sum(b - t for (b, _), (t, _) in zip(base, tuned)) / max(1, tokens)

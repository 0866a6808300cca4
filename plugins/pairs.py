"""The data path of the pairwise preference objectives: one ``prompt``/``chosen``/``rejected`` row
becomes token ids with the prompt masked, and a batch of pairs becomes one forward pass (chosen
rows, then rejected rows) whose summed completion log-probs the losses read.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F

import lft
from lft.data import chat
from lft.losses.logprobs import IGNORE_INDEX
from lft.model.forward import eval_mode, token_logprobs
from lft.objective import RowTexts

SIDES = ("chosen", "rejected")
TOKEN_KEYS = ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")


def split_prompt(example: dict) -> tuple[Any, Any, Any]:
    """``(prompt, chosen, rejected)``; conversational pairs without a prompt share their first messages."""
    missing = [c for c in SIDES if c not in example or example[c] is None]
    if "prompt" not in example and not all(isinstance(example.get(c), list) for c in SIDES):
        missing.insert(0, "prompt")
    if missing:
        found = ", ".join(example) or "no columns"
        raise lft.DataError(
            f"expected 'prompt', 'chosen' and 'rejected' columns; missing "
            f"{' and '.join(repr(m) for m in missing)} (found {found})"
        )
    if "prompt" in example:
        return example["prompt"], example["chosen"], example["rejected"]
    chosen, rejected = example["chosen"], example["rejected"]
    shared = 0
    while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == 0:
        raise lft.DataError(
            "conversational 'chosen' and 'rejected' without a 'prompt' must start with the same prompt messages"
        )
    return chosen[:shared], chosen[shared:], rejected[shared:]


def is_empty(completion: Any) -> bool:
    if isinstance(completion, str):
        return not completion.strip()
    if isinstance(completion, list):
        return not completion or all(not str(m.get("content", "")).strip() for m in completion if isinstance(m, dict))
    return False


def format_pair(example: dict, tokenizer: Any, options: Any, max_length: int, section: str) -> dict:
    """One preference row as ``chosen_input_ids``/``chosen_labels`` and ``rejected_*`` (prompt
    tokens labelled -100), or ``{"skip": reason}`` for a bad pair when ``bad_pairs`` is skip."""
    if options.chat_template and tokenizer.chat_template != options.chat_template:
        tokenizer.chat_template = options.chat_template
    prompt, chosen, rejected = split_prompt(example)
    problem = next(
        (f"the {side} completion is empty" for side, c in zip(SIDES, (chosen, rejected)) if is_empty(c)),
        "chosen and rejected are identical" if chosen == rejected else None,
    )
    if problem:
        if options.bad_pairs == "skip":
            return {"skip": problem}
        raise lft.DataError(f"{problem}; fix the row or set {section}.bad_pairs=skip to leave such pairs out")
    feature: dict[str, Any] = {"truncated": False}
    for side, completion in zip(SIDES, (chosen, rejected)):
        ids, labels = chat.tokenize_prompt_completion(tokenizer, prompt, completion, options.use_chat_template)
        ids, labels, truncated = chat.truncate(ids, labels, max_length)
        if all(label == IGNORE_INDEX for label in labels):
            return {"skip": f"the prompt fills data.max_length={max_length}; no {side} token is left"}
        feature.update({f"{side}_input_ids": ids, f"{side}_labels": labels})
        feature["truncated"] = feature["truncated"] or truncated
    return feature


def concatenated(batch: Mapping[str, Any], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask, labels)`` of the chosen rows followed by the rejected rows,
    right-padded to one width, so both go through the model in one forward pass."""
    width = max(batch["chosen_input_ids"].shape[1], batch["rejected_input_ids"].shape[1])

    def both(key: str, fill: int) -> torch.Tensor:
        parts = [batch[f"{side}_{key}"] for side in SIDES]
        return torch.cat([F.pad(p, (0, width - p.shape[1]), value=fill) for p in parts])

    return both("input_ids", pad_id), both("attention_mask", 0), both("labels", IGNORE_INDEX)


def pair_logps(
    model: Any, batch: Mapping[str, Any], pad_id: int, chunk: int, padding_free: bool | str = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probs and completion token counts, each (2B,): chosen rows first.
    ``padding_free`` (``data.padding_free``): the 2B sequences go through the model as one row
    without padding."""
    ids, mask, labels = concatenated(batch, pad_id)
    logps, scored = token_logprobs(model, ids, mask, labels, chunk, padding_free=padding_free)
    return logps.sum(-1), scored.sum(-1)


def measure_pairs(model: Any, tokenizer: Any, features: Any, settings: Any) -> dict:
    """Which completion of each held-out pair the model prefers, by its summed log-probs (the
    implied reward of any method): the share of pairs where it is the chosen one, and the mean
    margin of the sums."""
    from lft.use import evaluate

    wins, margins = [], []
    device = next(model.parameters()).device
    with eval_mode(model), evaluate.autocast(settings.precision, device):
        for batch in evaluate.batches(model, features, TOKEN_KEYS, tokenizer.pad_token_id, settings.batch_size):
            chosen, _ = evaluate.sequence_logprobs(model, batch, "chosen_", settings.chunk)
            rejected, _ = evaluate.sequence_logprobs(model, batch, "rejected_", settings.chunk)
            wins += (chosen > rejected).tolist()
            margins += (chosen - rejected).tolist()
    n = max(1, len(wins))
    return {"preference_accuracy": sum(wins) / n, "logps_margin": sum(margins) / n, "pairs": len(wins)}


def pair_texts(row: Mapping[str, Any]) -> RowTexts:
    """A preference row's prompt, its two answers, and that they must differ."""
    if not all(side in row for side in SIDES):
        return RowTexts()
    prompts = [row["prompt"]] if "prompt" in row else []
    return RowTexts(
        prompts=prompts, answers=[row["chosen"], row["rejected"]], contrasts=[(row["chosen"], row["rejected"])]
    )

"""Scoring with a trained reward model: ``lft.adapters.scorer.load(path).score(prompts, completions)``.

``path`` is a transformers sequence-classification folder with one label, as ``lft run --plugin
reward`` saves it (any such model works). A (prompt, completion) pair is formatted exactly as in
training: through the tokenizer's chat template as a user and an assistant turn, or, for a prompt
given as a list of messages, as that conversation followed by the completion.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from lft.data import chat
from lft.errors import ModelError


class RewardModel:
    """A loaded reward model. ``score`` returns one float per (prompt, completion); higher is better."""

    def __init__(self, model: Any, tokenizer: Any, use_chat_template: bool = True, max_length: int | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.use_chat_template = use_chat_template
        self.max_length = max_length

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode(self, prompt: Any, completion: Any) -> list[int]:
        ids, labels = chat.tokenize_prompt_completion(self.tokenizer, prompt, completion, self.use_chat_template)
        return chat.truncate(ids, labels, self.max_length)[0] if self.max_length else ids

    @torch.no_grad()
    def score(self, prompts: Sequence[Any], completions: Sequence[Any], batch_size: int = 8) -> list[float]:
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        encoded = [self.encode(p, c) for p, c in zip(prompts, completions)]
        scores: list[float] = []
        from lft.data.format import pad_collate

        for start in range(0, len(encoded), batch_size):
            batch = pad_collate([{"input_ids": row} for row in encoded[start : start + batch_size]], pad)
            logits = self.model(
                input_ids=batch["input_ids"].to(self.device), attention_mask=batch["attention_mask"].to(self.device)
            ).logits
            scores.extend(logits[:, 0].float().tolist())
        return scores


def load_classifier(path: str | Path, dtype: Any = None) -> Any:
    """The one-label sequence classifier in ``path``, or a one-line ModelError."""
    from transformers import AutoModelForSequenceClassification

    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        raise ModelError(
            f"{folder} is not a reward model folder: it has no config.json (train one with `lft run --plugin reward`)"
        )
    try:
        model = AutoModelForSequenceClassification.from_pretrained(folder, dtype=dtype or torch.float32)
    except (OSError, ValueError) as exc:
        raise ModelError(f"{folder}: could not load a sequence classifier ({str(exc).splitlines()[0]})") from None
    if model.config.num_labels != 1:
        raise ModelError(f"{folder}: a reward model has one output; this one has {model.config.num_labels}")
    return model


def load(path: str | Path, device: Any = None, dtype: Any = None) -> RewardModel:
    """Load a reward model folder; reads the formatting options lft saved beside it, if any."""
    from lft.model.loading import load_tokenizer

    folder = Path(path).expanduser()
    model = load_classifier(folder, dtype)
    use_template, max_length = True, None
    saved = folder / "lft_config.yaml"
    if saved.is_file():
        import yaml

        config = yaml.safe_load(saved.read_text(encoding="utf-8")) or {}
        use_template = bool((config.get("reward") or {}).get("use_chat_template", True))
        max_length = (config.get("data") or {}).get("max_length")
    if device is not None:
        model.to(device)
    return RewardModel(model, load_tokenizer(str(folder)), use_template, max_length)

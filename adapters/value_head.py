"""A scalar value head on a causal LM's backbone, and its export as a standard
``AutoModelForSequenceClassification`` folder.

During training the head is a ``Linear(hidden, 1)`` attached to the model being trained (LoRA,
QLoRA or full), reading the backbone's last hidden state at the sequence's last token: no
vocabulary projection is computed at all. The last token is found exactly as transformers'
sequence classifiers find it (the rightmost token that is not the pad token), so the exported
model scores a sequence the same as the trained one.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch

from lft.model.forward import unwrap

HEAD = "value_head"
_ADAPTER_MARKERS = ("lora_", "modules_to_save", "original_module")


def backbone(model: Any) -> Any:
    """The transformer body under the LM head (``model.model`` for Llama, ``transformer`` for GPT-2)."""
    base = unwrap(model)
    return getattr(base, base.base_model_prefix)


def is_quantized(model: Any) -> bool:
    base = unwrap(model)
    return getattr(base, "hf_quantizer", None) is not None or bool(getattr(base, "is_quantized", False))


def attach(model: Any) -> torch.nn.Linear:
    """The model's value head, created (trainable, small random weights) if it has none."""
    head = getattr(model, HEAD, None)
    if head is None:
        hidden = unwrap(model).config.get_text_config().hidden_size
        head = torch.nn.Linear(hidden, 1, bias=False)
        torch.nn.init.normal_(head.weight, std=1 / math.sqrt(hidden + 1))
        head.to(next(model.parameters()).device)
        setattr(model, HEAD, head)
    return head


def last_token(input_ids: torch.Tensor, pad_id: int | None) -> torch.Tensor:
    """Index of each row's rightmost token that is not ``pad_id``, shape (B,)."""
    if pad_id is None:
        return torch.full((input_ids.shape[0],), input_ids.shape[1] - 1, device=input_ids.device)
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    return (positions * (input_ids != pad_id)).argmax(-1)


def rewards(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, pad_id: int | None) -> torch.Tensor:
    """The scalar reward of each sequence, shape (B,)."""
    hidden = backbone(model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last_token(input_ids, pad_id)]
    head = getattr(model, HEAD)
    return head(pooled.to(head.weight.dtype)).squeeze(-1).float()


def merged_backbone_state(model: Any) -> dict[str, torch.Tensor]:
    """The backbone's weights with any LoRA adapter merged in; the model is left as it was."""
    adapters = callable(getattr(model, "merge_adapter", None)) and hasattr(model, "peft_config")
    with torch.no_grad():
        if adapters:
            model.merge_adapter()
        try:
            return {
                name.replace(".base_layer.", "."): value.detach().clone()
                for name, value in backbone(model).state_dict().items()
                if not any(marker in name for marker in _ADAPTER_MARKERS)
            }
        finally:
            if adapters:
                model.unmerge_adapter()


def export_sequence_classifier(model: Any, tokenizer: Any, path: str) -> None:
    """Save backbone + value head as a transformers sequence classifier (one label, safetensors)
    with the tokenizer, loadable by ``AutoModelForSequenceClassification.from_pretrained``."""
    from transformers import AutoModelForSequenceClassification

    head = getattr(model, HEAD)
    config = copy.deepcopy(unwrap(model).config)
    config.num_labels = 1
    config.pad_token_id = tokenizer.pad_token_id
    config.architectures = None
    config.id2label, config.label2id = {0: "reward"}, {"reward": 0}
    classifier = AutoModelForSequenceClassification.from_config(config)
    body = getattr(classifier, classifier.base_model_prefix)
    missing, unexpected = body.load_state_dict(merged_backbone_state(model), strict=False)
    if unexpected or [m for m in missing if "rotary" not in m]:
        raise RuntimeError(
            f"the backbone does not fit {type(classifier).__name__}: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    score = getattr(classifier, "score", None) or classifier.classifier
    with torch.no_grad():
        score.weight.copy_(head.weight.to(score.weight.dtype))
    classifier.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)

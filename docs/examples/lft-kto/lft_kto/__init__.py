"""KTO for lft: train on unpaired examples labelled desirable or undesirable.

Rows: ``{"prompt": ..., "completion": ..., "label": true|false}``; prompt may be a string or a
list of messages. Works with any model wrapper: with LoRA the reference is the model with its
adapter switched off, otherwise a frozen copy of the starting model.
"""

from __future__ import annotations

import contextlib
import copy
import json
from typing import Any

import torch
from pydantic import Field

import lft
from lft.config import Section
from lft.data import chat, task
from lft.data.format import pad_collate
from lft.model.forward import token_logprobs
from lft.model.loading import cache_dir
from lft.objective import Objective
from lft_kto.loss import kto_loss


class KTOOptions(Section):
    beta: float = Field(0.1, gt=0, description="Temperature of the implied reward.")
    desirable_weight: float = Field(1.0, gt=0, description="lambda_D: weight of desirable examples.")
    undesirable_weight: float = Field(1.0, gt=0, description="lambda_U: weight of undesirable examples.")


def split_prompt(ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
    """Prompt ids and completion ids (the trained span, end-of-turn token included)."""
    trained = [i for i, label in enumerate(labels) if label != -100]
    return ids[: trained[0]], ids[trained[0] : trained[-1] + 1]


def sequences(prompts: list[list[int]], completions: list[list[int]]) -> list[dict]:
    return [{"input_ids": p + c, "labels": [-100] * len(p) + c} for p, c in zip(prompts, completions)]


class KTOObjective(Objective):
    needs_reference = True

    def __init__(self, options: KTOOptions):
        self.options = options
        self.frozen: Any = None

    def setup(self, module: Any) -> None:
        if not hasattr(module.model, "disable_adapter"):  # no adapter to switch off: keep a frozen copy
            self.frozen = copy.deepcopy(module.model).eval().requires_grad_(False)

    def reference(self, module: Any) -> tuple[Any, Any]:
        if self.frozen is not None:
            return self.frozen, contextlib.nullcontext()
        return module.model, module.model.disable_adapter()

    def logps(self, model: Any, batch: dict, prefix: str, chunk: int) -> torch.Tensor:
        values, mask = token_logprobs(
            model, batch[f"{prefix}input_ids"], batch[f"{prefix}attention_mask"], batch[f"{prefix}labels"], chunk
        )
        return values.sum(-1)

    def __call__(self, module: Any, batch: dict) -> tuple[torch.Tensor, dict]:
        chunk = module.config.trainer.logits_chunk
        policy = self.logps(module.model, batch, "", chunk)
        with torch.no_grad():
            kl_policy = self.logps(module.model, batch, "kl_", chunk)
            model, context = self.reference(module)
            with context:
                reference = self.logps(model, batch, "", chunk)
                kl_reference = self.logps(model, batch, "kl_", chunk)
        desirable = batch["label"].bool()
        opts = self.options
        loss, rewards, z0 = kto_loss(
            policy,
            reference,
            desirable,
            kl_policy,
            kl_reference,
            opts.beta,
            opts.desirable_weight,
            opts.undesirable_weight,
        )
        metrics = {"kl": z0}
        if desirable.any():
            metrics["rewards/desirable"] = rewards[desirable].mean()
        if (~desirable).any():
            metrics["rewards/undesirable"] = rewards[~desirable].mean()
        return loss, metrics


class KTO:
    name = "kto"
    kind = "objective"
    options = KTOOptions

    @lft.hookimpl
    def lft_add_config(self, register: Any) -> None:
        register(self.name, self.options)

    @lft.hookimpl
    def lft_default_data(self) -> Any:
        return {**embedded_kto_data(), "settings": {"trainer.max_steps": 40, "trainer.lr": 5e-4, "eval.task": "arith"}}

    def format_row(self, example: dict, tokenizer: Any, config: Any) -> dict:
        missing = [c for c in ("prompt", "completion", "label") if c not in example]
        if missing:
            raise lft.DataError(f"missing column(s) {', '.join(missing)}; KTO rows need prompt, completion, label")
        if not isinstance(example["label"], bool):
            raise lft.DataError(f"'label' must be true or false, got {example['label']!r}")
        if not str(example["completion"]).strip():
            raise lft.DataError("'completion' is empty")
        ids, labels = chat.tokenize_prompt_completion(tokenizer, example["prompt"], example["completion"])
        prompt, completion = split_prompt(ids, labels)
        prompt = prompt[-max(1, config.data.max_length - len(completion)) :]
        completion = completion[: config.data.max_length - len(prompt)]
        return {"prompt_ids": prompt, "completion_ids": completion, "label": example["label"]}

    @lft.hookimpl
    def lft_format_example(self, example: dict, tokenizer: Any, config: Any) -> Any:
        return self.format_row(example, tokenizer, config)

    @lft.hookimpl
    def lft_collate(self, features: list, tokenizer: Any, config: Any) -> Any:
        prompts = [f["prompt_ids"] for f in features]
        completions = [f["completion_ids"] for f in features]
        # Each completion paired with the next row's prompt estimates KL(policy || reference).
        shifted = completions[1:] + completions[:1]
        matched = pad_collate(sequences(prompts, completions), tokenizer.pad_token_id)
        mismatched = pad_collate(sequences(prompts, shifted), tokenizer.pad_token_id)
        batch = dict(matched)
        batch.update({f"kl_{k}": v for k, v in mismatched.items()})
        batch["label"] = torch.tensor([f["label"] for f in features])
        return batch

    @lft.hookimpl
    def lft_objective(self, config: Any) -> Any:
        return KTOObjective(config.section(self.name))


def embedded_kto_data() -> dict[str, str]:
    """lft's embedded preference pairs as unpaired KTO rows (chosen -> true, rejected -> false)."""
    out = {}
    folder = cache_dir() / "kto"
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "eval"):
        target = folder / f"arith-kto-{split}.jsonl"
        if not target.is_file():
            rows = []
            for line in task.path("pref", split).read_text(encoding="utf-8").splitlines():
                pair = json.loads(line)
                rows.append({"prompt": pair["prompt"], "completion": pair["chosen"], "label": True})
                rows.append({"prompt": pair["prompt"], "completion": pair["rejected"], "label": False})
            tmp = target.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
            tmp.replace(target)
        out[split] = str(target)
    return out


__all__ = ["KTO", "KTOObjective", "KTOOptions", "kto_loss"]

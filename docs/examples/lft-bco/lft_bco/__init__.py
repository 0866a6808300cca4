"""BCO for lft: train on unpaired examples labelled desirable or undesirable.

Rows: ``{"prompt": ..., "completion": ..., "label": true|false}``; prompt may be a string or a
list of messages. Works with any model wrapper: the reference (``module.reference``) is the model
with its LoRA adapter switched off, otherwise a frozen copy of the starting model.
"""

from __future__ import annotations

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
from lft_bco.loss import bco_loss, running_mean


class BCOOptions(Section):
    beta: float = Field(0.1, gt=0, description="Scale of the implied reward log(pi / ref), the classifier's logit.")


def split_prompt(ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
    """Prompt ids and completion ids (the trained span, end-of-turn token included)."""
    trained = [i for i, label in enumerate(labels) if label != -100]
    return ids[: trained[0]], ids[trained[0] : trained[-1] + 1]


class BCOObjective(Objective):
    needs_reference = True
    progress_metrics = ("delta", "margin")

    def __init__(self, options: BCOOptions, chunk: int = 1024):
        self.options, self.chunk = options, chunk
        self.delta, self.seen = 0.0, 0  # the mean of the training rewards so far, and their number

    def logps(self, model: Any, batch: dict) -> torch.Tensor:
        values, mask = token_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["labels"], self.chunk)
        return values.sum(-1)

    def observe(self, module: Any, rewards: torch.Tensor) -> None:
        """Add a training batch's rewards, from every DDP process, to the running mean delta."""
        totals = torch.stack([rewards.float().sum(), torch.tensor(float(rewards.numel()), device=rewards.device)])
        trainer = module._trainer
        if trainer is not None and trainer.world_size > 1:
            totals = trainer.strategy.reduce(totals, reduce_op="sum")
        self.delta, self.seen = running_mean(self.delta, self.seen, float(totals[0]), int(totals[1]))

    def __call__(self, module: Any, batch: dict) -> tuple[torch.Tensor, dict]:
        with module.reference.model() as reference:  # eval mode, no gradients
            reference_logps = self.logps(reference, batch)
        policy = self.logps(module.model, batch)
        desirable = batch["label"].to(policy.device).bool()
        loss, rewards = bco_loss(policy, reference_logps.to(policy.dtype), desirable, self.delta, self.options.beta)
        metrics = {"delta": self.delta}
        if module.model.training:  # held-out batches leave delta as it is
            self.observe(module, rewards)
        if desirable.any():
            metrics["rewards_desirable"] = rewards[desirable].mean()
        if (~desirable).any():
            metrics["rewards_undesirable"] = rewards[~desirable].mean()
        if desirable.any() and (~desirable).any():
            metrics["margin"] = metrics["rewards_desirable"] - metrics["rewards_undesirable"]
        return loss, metrics

    def state_dict(self) -> dict:
        return {"delta": self.delta, "seen": self.seen}  # saved in checkpoints, so a resumed run keeps delta

    def load_state_dict(self, state: Any) -> None:
        self.delta, self.seen = float(state.get("delta", 0.0)), int(state.get("seen", 0))


class BCO:
    name = "bco"
    kind = "objective"
    options = BCOOptions

    @lft.hookimpl
    def lft_add_config(self, register: Any) -> None:
        register(self.name, self.options)

    @lft.hookimpl
    def lft_default_data(self) -> Any:
        return {**embedded_bco_data(), "settings": {"trainer.max_steps": 40, "trainer.lr": 5e-4, "eval.task": "arith"}}

    def format_row(self, example: dict, tokenizer: Any, config: Any) -> dict:
        missing = [c for c in ("prompt", "completion", "label") if c not in example]
        if missing:
            raise lft.DataError(f"missing column(s) {', '.join(missing)}; BCO rows need prompt, completion, label")
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
        rows = []
        for f in features:  # the prompt masked, the completion trained
            prompt, completion = f["prompt_ids"], f["completion_ids"]
            rows.append({"input_ids": prompt + completion, "labels": [-100] * len(prompt) + completion})
        batch = dict(pad_collate(rows, tokenizer.pad_token_id))
        batch["label"] = torch.tensor([f["label"] for f in features])
        return batch

    @lft.hookimpl
    def lft_objective(self, config: Any) -> Any:
        return BCOObjective(config.section(self.name), config.trainer.logits_chunk)


def embedded_bco_data() -> dict[str, str]:
    """lft's embedded preference pairs as unpaired BCO rows (chosen -> true, rejected -> false)."""
    out = {}
    folder = cache_dir() / "bco"
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "eval"):
        target = folder / f"arith-bco-{split}.jsonl"
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


__all__ = ["BCO", "BCOObjective", "BCOOptions", "bco_loss", "running_mean"]

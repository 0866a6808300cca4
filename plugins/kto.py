"""KTO: alignment from unpaired completions, each labelled desirable or undesirable (Ethayarajh et
al. 2024, https://arxiv.org/abs/2402.01306). The loss is in ``lft.losses.kto``.

* Data: ``prompt``, ``completion`` and a boolean ``label`` (true: desirable), the thumbs-up and
  thumbs-down a product collects. A preference row (``prompt``/``chosen``/``rejected``) is read as
  two unpaired rows, its chosen completion desirable and its rejected one not, so every pair set
  (the embedded one included) trains KTO as it is.
* Each batch also puts every completion after a prompt it does not answer (the next row's with a
  different prompt); the policy and the reference score those mismatched pairs to estimate
  KL(pi || ref), the reference point ``z0``. It is all-reduced over DDP processes.
* The reference is the model with its adapter switched off, or a frozen copy under full
  fine-tuning (``module.reference``).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from pydantic import Field

import lft
from lft.config import Section, own_settings
from lft.data import chat, task
from lft.data.format import pad_collate
from lft.losses.kto import KTOLoss
from lft.losses.logprobs import IGNORE_INDEX
from lft.model.forward import token_logprobs
from lft.objective import Objective, RowTexts
from lft.plugins.pairs import is_empty, pair_texts, split_prompt

#: The key of a formatted row: its completions, each ``(input_ids, labels)``, and their labels.
SEQUENCES, DESIRABLE = "kto_sequences", "kto_desirable"


class KTOOptions(Section):
    beta: float = Field(0.1, gt=0, description="Scale of the implied reward log(pi / ref) inside the sigmoid.")
    desirable_weight: float = Field(1.0, gt=0, description="lambda_D: weight of the desirable examples.")
    undesirable_weight: float = Field(
        1.0,
        gt=0,
        description="lambda_U: weight of the undesirable examples (the paper keeps lambda_D * n_D / "
        "(lambda_U * n_U) between 1 and 4/3).",
    )
    use_chat_template: bool = Field(
        True, description="Format string prompts and completions as a user and an assistant turn."
    )


def _label(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise lft.DataError(f"'label' must be true (desirable) or false (undesirable), got {value!r}")


def format_kto(example: Mapping[str, Any], tokenizer: Any, options: KTOOptions, max_length: int) -> dict:
    """One row as its completions (one, or two for a preference pair), each tokenized after the
    prompt with the prompt masked, and whether each is desirable."""
    if "label" in example or "completion" in example:
        missing = [c for c in ("prompt", "completion", "label") if c not in example]
        if missing:
            raise lft.DataError(
                f"missing column(s) {', '.join(repr(m) for m in missing)}; KTO rows need 'prompt', 'completion' "
                "and a true/false 'label' (or preference pairs: 'prompt', 'chosen', 'rejected')"
            )
        items = [(example["prompt"], example["completion"], _label(example["label"]))]
    elif "chosen" in example or "rejected" in example:
        prompt, chosen, rejected = split_prompt(dict(example))
        items = [(prompt, chosen, True), (prompt, rejected, False)]
    else:
        raise lft.DataError(
            f"KTO reads 'prompt', 'completion' and 'label' columns, or preference pairs ('prompt', 'chosen', "
            f"'rejected'); found {', '.join(example) or 'no columns'}"
        )
    sequences, desirable, truncated = [], [], False
    for prompt, completion, label in items:
        if is_empty(completion):
            raise lft.DataError("the completion is empty")
        ids, labels = chat.tokenize_prompt_completion(tokenizer, prompt, completion, options.use_chat_template)
        ids, labels, cut = chat.truncate(ids, labels, max_length)
        if all(label == IGNORE_INDEX for label in labels):
            return {"skip": f"the prompt fills data.max_length={max_length}; no completion token is left"}
        sequences.append([ids, labels])
        desirable.append(label)
        truncated = truncated or cut
    return {SEQUENCES: sequences, DESIRABLE: desirable, "truncated": truncated}


def _split(ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
    start = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    return list(ids[:start]), list(ids[start:])


def collate_kto(features: list[dict], pad_id: int, max_length: int) -> dict:
    """Every completion of the batch after its own prompt, and after the nearest following prompt
    of another row (the mismatched pairs of the KL estimate); ``kto_desirable`` (N,) bool."""
    parts = [_split(ids, labels) for f in features for ids, labels in f[SEQUENCES]]
    desirable = [d for f in features for d in f[DESIRABLE]]
    matched, mismatched = [], []
    n = len(parts)
    for i, (prompt, completion) in enumerate(parts):
        matched.append({"input_ids": prompt + completion, "labels": [IGNORE_INDEX] * len(prompt) + completion})
        j = next((k % n for k in range(i + 1, i + n) if parts[k % n][0] != prompt), (i + 1) % n)
        other = parts[j][1][: max(1, max_length - len(prompt))]
        mismatched.append({"input_ids": prompt + other, "labels": [IGNORE_INDEX] * len(prompt) + other})
    batch = pad_collate(matched, pad_id)
    batch.update({f"kl_{key}": value for key, value in pad_collate(mismatched, pad_id).items()})
    batch[DESIRABLE] = torch.tensor(desirable, dtype=torch.bool)
    return batch


def sequence_logps(model: Any, batch: Mapping[str, Any], prefix: str, chunk: int) -> torch.Tensor:
    values, _ = token_logprobs(
        model, batch[f"{prefix}input_ids"], batch[f"{prefix}attention_mask"], batch[f"{prefix}labels"], chunk
    )
    return values.sum(-1)


class KTOObjective(Objective):
    """``(module, batch) -> (loss, metrics)``: the KTO loss as a mean over the batch's examples."""

    needs_reference = True
    progress_metrics = ("kl", "margin", "rewards")
    summary_metrics = ("margin",)

    def __init__(self, loss: KTOLoss, chunk: int = 1024):
        self.loss, self.chunk = loss, chunk

    def units(self, batch: Mapping[str, Any]) -> dict:
        return {"examples": batch[DESIRABLE].numel()}

    def reference_point(self, module: Any, kl_policy: torch.Tensor, kl_reference: torch.Tensor) -> torch.Tensor:
        """z0 from this process's mismatched pairs, averaged over the DDP processes."""
        z0 = (kl_policy - kl_reference).float().mean()
        trainer = module._trainer
        if trainer is not None and trainer.world_size > 1:
            z0 = trainer.strategy.reduce(z0.to(trainer.strategy.root_device), reduce_op="mean")
        return z0.clamp(min=0).detach()

    def __call__(self, module: Any, batch: Mapping[str, Any]) -> tuple[torch.Tensor, dict]:
        with torch.no_grad():
            with module.reference.model() as reference:
                ref_logps = sequence_logps(reference, batch, "", self.chunk)
                kl_reference = sequence_logps(reference, batch, "kl_", self.chunk)
            kl_policy = sequence_logps(module.model, batch, "kl_", self.chunk)
        logps = sequence_logps(module.model, batch, "", self.chunk)
        z0 = self.reference_point(module, kl_policy, kl_reference)
        desirable = batch[DESIRABLE].to(logps.device)
        loss, rewards = self.loss(logps, ref_logps.to(logps.dtype), desirable, z0)
        metrics: dict[str, Any] = {"kl": z0, "logps": logps.detach().mean(), "rewards": rewards.mean()}
        if desirable.any():
            metrics["rewards_desirable"] = rewards[desirable].mean()
        if (~desirable).any():
            metrics["rewards_undesirable"] = rewards[~desirable].mean()
        if desirable.any() and (~desirable).any():
            metrics["margin"] = metrics["rewards_desirable"] - metrics["rewards_undesirable"]
        return loss, metrics

    def row_texts(self, row: Mapping[str, Any]) -> RowTexts:
        if "completion" in row:
            return RowTexts(prompts=[row["prompt"]] if "prompt" in row else [], answers=[row["completion"]])
        return pair_texts(row)


class KTO:
    """Objective: KTO on unpaired desirable/undesirable completions (or pairs read as such)."""

    name = "kto"
    kind = "objective"
    options: type[KTOOptions] = KTOOptions
    #: The embedded preference pairs, read as unpaired rows: 4 pairs (8 completions) a step.
    default_settings: dict[str, Any] = {"trainer.max_steps": 40, "trainer.batch_size": 4, "trainer.lr": 5e-4}

    @lft.hookimpl
    def lft_add_config(self, register: Any) -> None:
        register(self.name, self.options)

    @lft.hookimpl
    def lft_default_data(self) -> Any:
        return {**task.files("pref"), "settings": own_settings(self.default_settings, self.name, self.options)}

    def format_row(self, example: dict, tokenizer: Any, config: Any) -> dict:
        return format_kto(example, tokenizer, config.section(self.name), config.data.max_length)

    @lft.hookimpl
    def lft_format_example(self, example: dict, tokenizer: Any, config: Any) -> Any:
        return self.format_row(example, tokenizer, config)

    @lft.hookimpl
    def lft_collate(self, features: list, tokenizer: Any, config: Any) -> Any:
        return collate_kto(features, tokenizer.pad_token_id, config.data.max_length)

    def loss(self, options: KTOOptions) -> KTOLoss:
        return KTOLoss(options.beta, options.desirable_weight, options.undesirable_weight)

    def objective(self, config: Any) -> Any:
        return KTOObjective(self.loss(config.section(self.name)), config.trainer.logits_chunk)

    @lft.hookimpl
    def lft_objective(self, config: Any) -> Any:
        return self.objective(config)

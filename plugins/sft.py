"""Supervised fine-tuning: maximise the likelihood of the reference completions.

Rows are ``messages`` (a conversation), ``prompt`` + ``completion``, or plain ``text``.
Conversations go through the tokenizer's own chat template, and by default only the assistant
turns are trained, each up to and including its end-of-turn token.
"""

from __future__ import annotations

import math
from typing import Any, Literal, Mapping

from pydantic import Field

import lft
from lft.config import Section
from lft.data import chat, task
from lft.losses.sft import masked_nll
from lft.model.forward import eval_mode, token_logprobs
from lft.objective import Objective, RowTexts, trained_tokens
from lft.use import evaluate


class SFTOptions(Section):
    train_on: Literal["assistant", "last_assistant", "all"] = Field(
        "assistant", description="Which tokens of a conversation are trained."
    )
    chat_template: str | None = Field(
        None,
        description="A chat template to use instead of the tokenizer's: chatml, "
        "simple (any base model), or Jinja text.",
    )
    use_chat_template: bool = Field(
        True, description="Format prompt/completion strings as a user and an assistant turn."
    )


class SFTObjective(Objective):
    """Token-level mean NLL of the trained tokens, computed in chunks over the vocabulary."""

    summary_metrics = ("perplexity",)
    reads_packed_rows = True

    def units(self, batch: Mapping[str, Any]) -> dict:
        return {"tokens": trained_tokens(batch["labels"])}

    def __call__(self, module: Any, batch: Mapping[str, Any]) -> tuple[Any, dict]:
        logps, mask = token_logprobs(
            module.model,
            batch["input_ids"],
            batch["attention_mask"],
            batch["labels"],
            module.config.trainer.logits_chunk,
            position_ids=batch.get("position_ids"),  # packed rows (data.packing, data.padding_free)
        )
        return masked_nll(logps, mask), {}

    def row_texts(self, row: Mapping[str, Any]) -> RowTexts:
        if isinstance(row.get("messages"), list):
            turns = row["messages"]
            prompts = [
                turns[:i] for i, m in enumerate(turns) if isinstance(m, dict) and m.get("role") == "assistant" and i
            ]
            return RowTexts(prompts=prompts, answers=[turns])
        if "prompt" in row and "completion" in row:
            return RowTexts(prompts=[row["prompt"]], answers=[row["completion"]])
        return RowTexts(answers=[row["text"]] if "text" in row else [])

    def measure(self, model: Any, tokenizer: Any, features: Any, settings: Any) -> dict:
        """The held-out mean NLL per trained token over the whole set (a sum over every token
        divided by their count, so batching does not change it), and its perplexity."""
        total, count = 0.0, 0.0
        with eval_mode(model), evaluate.autocast(settings.precision, next(model.parameters()).device):
            for batch in evaluate.batches(
                model, features, ("input_ids", "labels"), tokenizer.pad_token_id, settings.batch_size
            ):
                logp, n = evaluate.sequence_logprobs(model, batch, "", settings.chunk)
                total -= float(logp.sum())
                count += float(n.sum())
        loss = total / max(count, 1.0)
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": int(count)}


class SFT:
    """Objective: supervised fine-tuning on conversations, prompt/completion pairs or text."""

    name = "sft"
    kind = "objective"
    options = SFTOptions

    @lft.hookimpl
    def lft_add_config(self, register: Any) -> None:
        register(self.name, self.options)

    #: Settings for the embedded task that make bare `lft run` a few minutes on a laptop CPU. Without the
    #: mix, the tuned model's everyday answers degenerated (52% against the base's 8%: loops, counting,
    #: "The answer is N." to any question); a tenth of the rows from the base's own answers to general
    #: prompts keeps them (0%) at a task accuracy of 0.60 instead of 0.64 (docs/guards.md).
    default_settings = {
        "trainer.max_steps": 60,
        "trainer.batch_size": 8,
        "trainer.lr": 1e-3,
        "guards.forgetting.mix_ratio": 0.1,
        "guards.forgetting.mix_data": "self",
    }

    @lft.hookimpl
    def lft_default_data(self) -> Any:
        return {**task.files("sft"), "settings": self.default_settings}

    def format_row(self, example: dict, tokenizer: Any, config: Any) -> dict:
        opts = config.section(self.name)
        template = chat.resolve_template(opts.chat_template)
        if template and tokenizer.chat_template != template:
            tokenizer.chat_template = template
        if "messages" in example:
            ids, labels = chat.tokenize_conversation(tokenizer, example["messages"], opts.train_on)
        elif "prompt" in example and "completion" in example:
            ids, labels = chat.tokenize_prompt_completion(
                tokenizer, example["prompt"], example["completion"], opts.use_chat_template
            )
        elif "text" in example:
            ids, labels = chat.tokenize_text(tokenizer, example["text"])
        else:
            online = " (rows with a prompt and no completion are for online methods: --plugin grpo or ppo)"
            raise lft.DataError(
                f"expected a 'messages', 'prompt' + 'completion' or 'text' column; "
                f"found {', '.join(example) or 'no columns'}{online if 'prompt' in example else ''}"
            )
        ids, labels, truncated = chat.truncate(ids, labels, config.data.max_length)
        return {"input_ids": ids, "labels": labels, "truncated": truncated}

    @lft.hookimpl
    def lft_format_example(self, example: dict, tokenizer: Any, config: Any) -> Any:
        return self.format_row(example, tokenizer, config)

    def objective(self, config: Any) -> Any:
        return SFTObjective()

    @lft.hookimpl
    def lft_objective(self, config: Any) -> Any:
        return self.objective(config)

"""What the online methods (ppo, grpo) share as plugins: prompt data, collation and the embedded
defaults. Their update loop and options are ``lft.plugins.online_update``.

Rows have a ``prompt`` (a string or a list of messages) and any other columns, which reach the
reward functions unchanged (for example ``answer``). The experience itself comes from the
``lft_rollout`` hook (``lft.online.rollout`` by default), before the objective's ``training_step``.
"""

from __future__ import annotations

from typing import Any

import lft
from lft.config import own_settings
from lft.data import chat, task
from lft.data.format import pad_collate
from lft.online.rollout import RESERVED
from lft.plugins.online_update import OnlineOptions, RolloutObjective

#: What the online methods' default jobs on the embedded task's prompts share: 8 prompts a step,
#: a constant rate, 32 new tokens, 32 held-out prompts. Each method adds its own samples per prompt.
EMBEDDED_ROLLOUT: dict = {
    "trainer.max_steps": 50,
    "trainer.batch_size": 8,
    "trainer.lr": 5e-4,
    "trainer.warmup_steps": 0,
    "trainer.schedule": "constant",
    "data.max_eval_rows": 32,
    "{name}.max_new_tokens": 32,
}


class OnlineMethod:
    """Base of the online objective plugins: prompt data, collation and the embedded defaults."""

    #: The plugin's name, set by each method (ppo, grpo).
    name: str
    kind = "objective"
    options: type[OnlineOptions] = OnlineOptions
    #: Settings for the embedded task's prompts that make `lft run --plugin NAME` a few minutes on a CPU.
    default_settings: dict = {}

    @lft.hookimpl
    def lft_add_config(self, register: Any) -> None:
        register(self.name, self.options)

    @lft.hookimpl
    def lft_default_data(self) -> Any:
        return {**task.files("prompts"), "settings": own_settings(self.default_settings, self.name, self.options)}

    def format_row(self, example: dict, tokenizer: Any, config: Any) -> dict:
        if "prompt" not in example:
            raise lft.DataError(
                f"{self.name} needs a 'prompt' column (a string or a list of messages); "
                f"found {', '.join(example) or 'no columns'}"
            )
        taken = sorted(set(example) & set(RESERVED))
        if taken:
            raise lft.DataError(f"column name(s) {', '.join(taken)} are reserved in online data; rename them")
        text = chat.prompt_text(tokenizer, example["prompt"], config.section(self.name).use_chat_template)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        limit = config.data.max_length
        return {**example, "prompt_input_ids": ids[-limit:], "truncated": len(ids) > limit}

    @lft.hookimpl
    def lft_format_example(self, example: dict, tokenizer: Any, config: Any) -> Any:
        return self.format_row(example, tokenizer, config)

    @lft.hookimpl
    def lft_collate(self, features: list, tokenizer: Any, config: Any) -> Any:
        """Padded prompt ids (the rollout moves the padding left); every other column as a list."""
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        batch = pad_collate([{"prompt_input_ids": f["prompt_input_ids"]} for f in features], pad)
        batch.update({key: [f.get(key) for f in features] for key in features[0] if key != "prompt_input_ids"})
        return batch

    #: The ``RolloutObjective`` subclass this method trains with.
    objective_class: type = RolloutObjective

    def objective(self, config: Any) -> Any:
        return self.objective_class(config.section(self.name), config)

    @lft.hookimpl
    def lft_objective(self, config: Any) -> Any:
        return self.objective(config)

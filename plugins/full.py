"""Full fine-tuning: every weight of the model trains."""

from __future__ import annotations

from typing import Any

import lft


class Full:
    """Model wrapper that unfreezes every parameter. Saves a transformers model folder."""

    name = "full"
    kind = "wrapper"

    @lft.hookimpl
    def lft_wrap_model(self, model: Any, config: Any) -> Any:
        for param in model.parameters():
            param.requires_grad_(True)
        if config.trainer.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        return model

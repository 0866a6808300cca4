"""Critics for PPO: per-token value estimates.

* ``ValueHead``: a linear layer on the policy's own final hidden states (the body is shared, so
  one forward pass gives both log-probs and values). It starts at zero, so the first values are 0.
* ``TokenCritic``: a separate transformer body with a linear head, initialised from a reward model
  (a one-label ``AutoModelForSequenceClassification`` folder): the head that scored the last token
  of a sequence now scores every token. With a LoRA policy the critic's body gets LoRA adapters
  too, and its head trains fully.
"""

from __future__ import annotations

from typing import Any

import torch

from lft.adapters.scorer import load_classifier
from lft.errors import ModelError
from lft.model.forward import unwrap


def hidden_size(model: Any) -> int:
    config = unwrap(model).config
    return (config.get_text_config() if hasattr(config, "get_text_config") else config).hidden_size


class ValueHead(torch.nn.Module):
    """``Linear(hidden, 1)`` over final hidden states (…, H) -> values (…), in float32."""

    def __init__(self, size: int):
        super().__init__()
        self.linear = torch.nn.Linear(size, 1)
        torch.nn.init.zeros_(self.linear.weight)
        torch.nn.init.zeros_(self.linear.bias)

    @classmethod
    def for_model(cls, model: Any) -> "ValueHead":
        head = cls(hidden_size(model))
        return head.to(next(model.parameters()).device)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden.to(self.linear.weight.dtype)).squeeze(-1).float()


class TokenCritic(torch.nn.Module):
    """A transformer body and a linear head: the value of every position, shape (B, T)."""

    def __init__(self, body: torch.nn.Module, head: torch.nn.Module):
        super().__init__()
        self.body = body
        self.head = head

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        hidden = self.body(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state
        return self.head(hidden.to(self.head.weight.dtype)).squeeze(-1).float()


def critic_from_classifier(classifier: Any, lora: Any = None) -> TokenCritic:
    """A ``TokenCritic`` from a sequence classifier's body and score head. With ``lora`` (the run's
    LoRA options), the body is frozen and gets LoRA adapters; otherwise every weight trains."""
    body = getattr(classifier, classifier.base_model_prefix)
    head = getattr(classifier, "score", None) or getattr(classifier, "classifier", None)
    if not isinstance(head, torch.nn.Linear):
        raise ModelError(f"{type(classifier).__name__} has no linear score head to start a critic from")
    if lora is not None:
        from lft.adapters.lora import apply_lora

        body = apply_lora(body, lora.r, lora.alpha, lora.dropout, lora.target_modules, task_type=None).get_base_model()
    head.requires_grad_(True)
    critic = TokenCritic(body, head)
    critic.train()
    return critic


def reward_model_critic(config: Any, policy: Any) -> TokenCritic:
    """The critic of ``ppo.critic=reward_model``: from ``reward_model.path``, trained like the policy."""
    from lft.errors import ConfigError

    path = getattr(getattr(config, "reward_model", None), "path", None)
    if not path:
        raise ConfigError(
            "ppo.critic=reward_model needs reward_model.path (a model saved by `lft run --plugin reward`)"
        )
    adapters = callable(getattr(policy, "disable_adapter", None))
    critic = critic_from_classifier(load_classifier(path), config.lora if adapters else None)
    return critic.to(next(policy.parameters()).device)

"""Tokenising conversations through the tokenizer's own chat template, with a label mask.

The template renders the conversation once. The trained span of each assistant turn is found by
rendering the conversation up to that turn with and without it, which needs the template to be
prefix-preserving (checked, with a clear error when it is not). Tokens are mapped to spans by
their character offsets. A turn is trained up to and including its end-of-turn token, so the
model learns to stop; what the template adds after that token (a newline) is not trained.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from lft.errors import DataError
from lft.losses.logprobs import IGNORE_INDEX

# End-of-turn markers of common chat templates, in addition to the tokenizer's eos token.
_EOT_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>", "</s>")
ROLES = ("system", "user", "assistant", "tool")


def end_of_turn_ids(tokenizer: Any) -> set[int]:
    """The eos token and any special end-of-turn token the tokenizer knows."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    special = set(tokenizer.all_special_tokens or [])
    for token in _EOT_TOKENS:
        if token in special:
            token_id = tokenizer.convert_tokens_to_ids(token)
            if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
                ids.add(token_id)
    return ids


#: Named chat templates, for tokenizers that have none (base models). ``chatml`` needs the
#: <|im_start|> and <|im_end|> special tokens; ``simple`` works with any tokenizer: each assistant
#: turn ends with its eos token, so the model learns to stop.
TEMPLATES = {
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "simple": (
        "{% for message in messages %}"
        "{% if message['role'] == 'assistant' %}{{ 'Assistant: ' + message['content'] + eos_token + '\n' }}"
        "{% else %}{{ message['role'] | capitalize + ': ' + message['content'] + '\n' }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
    ),
}


def resolve_template(value: str | None) -> str | None:
    """A named template (``chatml``, ``simple``) or the Jinja text itself."""
    if value is None:
        return None
    return TEMPLATES.get(value.strip().lower(), value)


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def turn_texts(value: Any, keep: Callable[[Any], bool] = lambda role: True) -> list[str]:
    """The texts of a string (itself) or of a list of messages (the contents of the turns whose
    role, None when missing, ``keep`` accepts)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [
            m["content"]
            for m in value
            if isinstance(m, dict) and isinstance(m.get("content"), str) and keep(m.get("role"))
        ]
    return []


def check_messages(messages: Any) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise DataError("'messages' must be a non-empty list of {role, content} objects")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError(f"message {i} must be an object with 'role' and 'content'")
        if message["role"] not in ROLES:
            raise DataError(f"message {i} has role {message['role']!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(message["content"], str):
            raise DataError(f"message {i} content must be a string, got {type(message['content']).__name__}")
        out.append({"role": message["role"], "content": message["content"]})
    return out


def render(tokenizer: Any, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _char_spans(tokenizer: Any, messages: list[dict], train_on: str) -> tuple[str, list[tuple[int, int]]]:
    full = render(tokenizer, messages)
    assistant_turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not assistant_turns:
        raise DataError("the conversation has no assistant message to train on")
    if train_on == "last_assistant":
        assistant_turns = assistant_turns[-1:]
    spans = []
    for i in assistant_turns:
        before = render(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        upto = render(tokenizer, messages[: i + 1])
        if not upto.startswith(before) or not full.startswith(upto):
            raise DataError(
                "the tokenizer's chat template is not prefix-preserving (rendering a conversation turn by turn "
                "changes earlier turns), so assistant tokens cannot be located; use sft.train_on=all or a "
                "template that renders each turn the same way"
            )
        spans.append((len(before), len(upto)))
    return full, spans


def tokenize_conversation(
    tokenizer: Any, messages: list[dict], train_on: str = "assistant"
) -> tuple[list[int], list[int]]:
    """Token ids of a conversation and labels that train only the assistant turns.

    ``train_on`` is ``assistant`` (every assistant turn), ``last_assistant`` or ``all``.
    """
    if not has_chat_template(tokenizer):
        raise DataError(
            "the tokenizer has no chat template, so conversational rows cannot be formatted; "
            "set sft.chat_template to chatml, simple or a Jinja template, or use plain 'text' rows"
        )
    messages = check_messages(messages)
    if train_on == "all":
        ids = tokenizer(render(tokenizer, messages), add_special_tokens=False)["input_ids"]
        return list(ids), list(ids)
    full, spans = _char_spans(tokenizer, messages, train_on)
    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoded["input_ids"])
    labels = [IGNORE_INDEX] * len(ids)
    eot = end_of_turn_ids(tokenizer)
    for start, end in spans:
        inside = [t for t, (s, e) in enumerate(encoded["offset_mapping"]) if start <= s < end and e > s]
        # Train up to and including the last end-of-turn token of the turn; drop what follows it.
        stops = [t for t in inside if ids[t] in eot]
        if stops:
            inside = [t for t in inside if t <= stops[-1]]
        for t in inside:
            labels[t] = ids[t]
    return ids, labels


def tokenize_prompt_completion(
    tokenizer: Any, prompt: Any, completion: Any, use_template: bool = True
) -> tuple[list[int], list[int]]:
    """Prompt + completion, the prompt masked. Strings go through the chat template as one
    user and one assistant turn when the tokenizer has one; lists are taken as messages."""
    if isinstance(prompt, list) or isinstance(completion, list):
        prompt_msgs = check_messages(prompt) if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        completion_msgs = (
            check_messages(completion)
            if isinstance(completion, list)
            else [{"role": "assistant", "content": completion}]
        )
        return tokenize_conversation(tokenizer, prompt_msgs + completion_msgs, train_on="last_assistant")
    if not isinstance(prompt, str) or not isinstance(completion, str):
        raise DataError("'prompt' and 'completion' must be strings or lists of messages")
    if use_template and has_chat_template(tokenizer):
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
        return tokenize_conversation(tokenizer, messages, train_on="last_assistant")
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids = list(prompt_ids) + list(completion_ids) + eos
    return ids, [IGNORE_INDEX] * len(prompt_ids) + list(completion_ids) + eos


def tokenize_text(tokenizer: Any, text: Any) -> tuple[list[int], list[int]]:
    if not isinstance(text, str):
        raise DataError(f"'text' must be a string, got {type(text).__name__}")
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return ids, list(ids)


def prompt_text(tokenizer: Any, prompt: Any, use_template: bool = True) -> str:
    """The text a model is given to answer ``prompt`` (string or messages) at inference."""
    if isinstance(prompt, list):
        return render(tokenizer, check_messages(prompt), add_generation_prompt=True)
    if use_template and has_chat_template(tokenizer):
        return render(tokenizer, [{"role": "user", "content": str(prompt)}], add_generation_prompt=True)
    return str(prompt)


def truncate(ids: Sequence[int], labels: Sequence[int], max_length: int) -> tuple[list[int], list[int], bool]:
    if len(ids) <= max_length:
        return list(ids), list(labels), False
    return list(ids[:max_length]), list(labels[:max_length]), True

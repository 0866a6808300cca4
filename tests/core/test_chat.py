"""Label masking: exactly the assistant turns are trained, each end-of-turn token included."""

import pytest

from lft.data import chat
from lft.errors import DataError
from lft.plugin.testing import build_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def trained_text(tok, ids, labels):
    """The trained tokens, decoded one span at a time (spans separated by '|')."""
    spans, current = [], []
    for token, label in zip(ids, labels):
        if label != -100:
            assert label == token
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    if current:
        spans.append(current)
    return [tok.decode(s) for s in spans]


def test_assistant_turns_trained_with_end_of_turn(tok):
    messages = [
        {"role": "user", "content": "Tom has 3 apples. How many?"},
        {"role": "assistant", "content": "The answer is 3."},
        {"role": "user", "content": "And 4?"},
        {"role": "assistant", "content": "The answer is 4."},
    ]
    ids, labels = chat.tokenize_conversation(tok, messages)
    assert trained_text(tok, ids, labels) == ["The answer is 3.<|im_end|>", "The answer is 4.<|im_end|>"]
    # The newline after <|im_end|> and every header stay masked.
    full = tok.decode(ids)
    assert full.count("<|im_start|>assistant\n") == 2
    assert ids[-1] != tok.convert_tokens_to_ids("<|im_end|>")  # the template's final "\n" is not trained
    assert labels[-1] == -100


def test_last_assistant_and_all(tok):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Goodbye."},
    ]
    ids, labels = chat.tokenize_conversation(tok, messages, train_on="last_assistant")
    assert trained_text(tok, ids, labels) == ["Goodbye.<|im_end|>"]
    ids, labels = chat.tokenize_conversation(tok, messages, train_on="all")
    assert labels == ids


def test_prompt_completion_uses_template(tok):
    ids, labels = chat.tokenize_prompt_completion(tok, "What is 2 + 2?", "4")
    assert trained_text(tok, ids, labels) == ["4<|im_end|>"]
    assert tok.decode(ids).startswith("<|im_start|>system\nYou are a tiny test model.<|im_end|>\n<|im_start|>user\n")


def test_prompt_completion_without_template_masks_prompt(tok):
    ids, labels = chat.tokenize_prompt_completion(tok, "What is 2 + 2? ", "4", use_template=False)
    assert trained_text(tok, ids, labels) == ["4<|im_end|>"]


def test_text_rows_train_everything_plus_eos(tok):
    ids, labels = chat.tokenize_text(tok, "Tom has 3 apples.")
    assert labels == ids and ids[-1] == tok.eos_token_id


def test_non_prefix_preserving_template_is_reported(tok):
    tok2 = build_tokenizer()
    # Renders the number of messages in the header, so earlier turns change as turns are added.
    tok2.chat_template = (
        "{% for m in messages %}{{ messages|length }}{{ m['role'] }}: {{ m['content'] }}<|im_end|>{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    with pytest.raises(DataError, match="not prefix-preserving"):
        chat.tokenize_conversation(tok2, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])


@pytest.mark.parametrize(
    "messages, expected",
    [
        ([], "non-empty list"),
        ([{"role": "user"}], "'role' and 'content'"),
        ([{"role": "robot", "content": "x"}], "role 'robot'"),
        ([{"role": "user", "content": "only a question"}], "no assistant message"),
    ],
)
def test_bad_messages(tok, messages, expected):
    with pytest.raises(DataError, match=expected):
        chat.tokenize_conversation(tok, messages)

"""Template lint: each check fires on a template built to trip it and stays silent on ChatML."""

import pytest
from transformers import AutoTokenizer, GenerationConfig

import lft
from lft.data import chat
from lft.data.files import Rows
from lft.guards.template import check_template
from lft.plugin.manager import PluginManager
from lft.plugins.sft import SFTObjective

ROWS = [
    {
        "messages": [
            {
                "role": "user",
                "content": "Tom has 5 apples. Tom gets 16 more apples. How many apples does Tom have now?",
            },
            {"role": "assistant", "content": "5 + 16 = 21. The answer is 21."},
        ]
    },
    {
        "messages": [
            {"role": "user", "content": "Ana has 9 coins and gives 2 of them away. How many coins does Ana have left?"},
            {"role": "assistant", "content": "9 - 2 = 7. The answer is 7."},
        ]
    },
]
# Renders every turn but never closes one: no end-of-turn token ends up in the labels.
NO_EOT = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Ignores add_generation_prompt: at inference the assistant header is missing from the prompt.
NO_GENERATION_PROMPT = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
)
# Numbers every turn by the length of the conversation, so earlier turns change as it grows.
NOT_PREFIX_PRESERVING = (
    "{% for m in messages %}{{ messages|length }}{{ m['role'] }}: {{ m['content'] }}<|im_end|>"
    "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
)


@pytest.fixture
def tokenizer(lft_tiny_model):
    return AutoTokenizer.from_pretrained(lft_tiny_model)


def lint(tokenizer, rows=ROWS, generation_config=None, **overrides):
    config = lft.load_config(overrides=[f"{k}={v}" for k, v in overrides.items()])
    selection = PluginManager().select(config.plugins)
    return check_template(
        tokenizer,
        Rows("data.jsonl", rows, [f"data.jsonl:{i + 1}" for i in range(len(rows))]),
        selection.hook,
        config,
        selection.objective,
        generation_config=generation_config,
        row_texts=SFTObjective().row_texts,
    )


def test_chatml_is_clean(tokenizer):
    finding = lint(tokenizer, generation_config=GenerationConfig(eos_token_id=tokenizer.eos_token_id))
    assert finding.status == "ok", finding.problems
    assert finding.data["eot_checked"] == 2 and finding.data["prompts_checked"] == 2


def test_labels_without_the_end_of_turn_token_are_caught(tokenizer):
    tokenizer.chat_template = NO_EOT
    finding = lint(tokenizer)
    assert finding.status == "warning"
    assert any(
        "2 of 2 examples have no end-of-turn token ('<|endoftext|>', '<|im_end|>')" in p for p in finding.problems
    )
    assert finding.examples == ["data.jsonl:1", "data.jsonl:2"]


def test_a_prompt_at_inference_that_differs_from_training_is_caught(tokenizer):
    rows = [{"prompt": r["messages"][0]["content"], "completion": r["messages"][1]["content"]} for r in ROWS]
    assert lint(tokenizer, rows=rows).status == "ok"
    finding = lint(
        tokenizer, rows=rows, **{"sft.use_chat_template": "false"}
    )  # trained plain, prompted with the template
    assert finding.status == "warning"
    problem = next(p for p in finding.problems if "inference differs" in p)
    assert (
        "2 of 2 rows" in problem
        and "training 'Tom has 5 apples" in problem
        and "inference '<|im_start|>system" in problem
    )


def test_a_template_without_generation_prompt_trains_the_role_header(tokenizer):
    tokenizer.chat_template = NO_GENERATION_PROMPT
    finding = lint(tokenizer)
    assert finding.status == "warning"
    problem = next(p for p in finding.problems if "before the assistant's words" in p)
    assert problem.startswith("2 of 2 rows train '<|im_start|>assistant\\n'")


def test_base_model_without_template_gets_a_choice_and_the_choice_works(tokenizer):
    tokenizer.chat_template = None
    finding = lint(tokenizer)
    assert finding.status == "error"
    assert "no chat template" in finding.problems[0] and "sft.chat_template=NAME" in finding.problems[0]
    assert "chatml (this tokenizer has <|im_start|> and <|im_end|>)" in finding.problems[0]
    tokenizer.chat_template = None
    assert lint(tokenizer, **{"sft.chat_template": "simple"}).status == "ok"  # answers end with the eos token
    assert tokenizer.chat_template == chat.TEMPLATES["simple"]


def test_generation_config_that_does_not_stop_on_the_trained_token(tokenizer):
    finding = lint(tokenizer, generation_config=GenerationConfig(eos_token_id=0))
    assert finding.status == "warning"
    assert "generation_config stops on ids [0]" in finding.problems[0] and "'<|im_end|>' (2)" in finding.problems[0]


def test_a_template_that_is_not_prefix_preserving_is_an_error_on_multi_turn_rows(tokenizer):
    tokenizer.chat_template = NOT_PREFIX_PRESERVING
    multi = [{"messages": ROWS[0]["messages"] + ROWS[1]["messages"]}]
    finding = lint(tokenizer, rows=multi)
    assert finding.status == "error"
    assert any("not prefix-preserving" in p for p in finding.problems)
    single = lint(tokenizer)  # single-turn data trains fine; the template is still reported
    assert any("not prefix-preserving on a two-exchange conversation" in p for p in single.problems)


def test_named_templates_resolve():
    assert chat.resolve_template("ChatML") == chat.TEMPLATES["chatml"]
    assert chat.resolve_template("{{ messages }}") == "{{ messages }}"
    assert chat.resolve_template(None) is None

"""Data lint and contamination: planted problems are found, the embedded task's splits are clean."""

import json

import pytest

from lft.data import task
from lft.data.files import Rows
from lft.guards.contamination import check_contamination, find_overlaps, words
from lft.guards.lint import lint_rows
from lft.plugins.online_update import RolloutObjective
from lft.plugins.pairs import pair_texts
from lft.plugins.sft import SFTObjective

SFT_TEXTS = SFTObjective().row_texts


def any_texts(row):
    """How the objective of each row's format reads it (an SFT row, a preference pair, a prompt)."""
    if "chosen" in row:
        return pair_texts(row)
    if "answer" in row and "completion" not in row:
        return RolloutObjective.row_texts(None, row)
    return SFT_TEXTS(row)


PASSAGE = (
    "The committee met on a grey Tuesday morning to decide whether the old railway bridge over the river "
    "should be repaired or replaced, and after three hours of argument about costs, safety and the views "
    "of the people who crossed it every day, they chose to keep the bridge and strengthen its piers."
)


def rows(items, name="train.jsonl"):
    return Rows(name, list(items), [f"{name}:{i + 1}" for i in range(len(items))])


def embedded(form, split):
    return rows([json.loads(x) for x in task.path(form, split).read_text().splitlines()], f"{form}-{split}.jsonl")


def test_lint_finds_empty_completions_duplicates_identical_pairs_and_truncation():
    data = rows(
        [
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]},
            {"prompt": "a", "completion": "b"},
            {"prompt": "a", "completion": "b"},
            {"prompt": "q", "chosen": "same answer", "rejected": "same answer "},
            {"text": "fine"},
        ]
    )
    finding = lint_rows(data, any_texts, truncated=2, longest=900, max_length=512)
    assert finding.status == "warning"
    assert finding.data == {
        "rows": 5,
        "empty": 1,
        "duplicates": 1,
        "identical_answers": 1,
        "truncated": 2,
        "longest": 900,
    }
    assert "train.jsonl:1" in finding.problems[0] and "train.jsonl:3 repeats train.jsonl:2" in finding.problems[1]
    assert "train.jsonl:4" in finding.problems[2] and "data.max_length=512" in finding.problems[3]


def test_lint_is_silent_on_the_embedded_data():
    for form in task.FORMS:
        assert lint_rows(embedded(form, "train"), any_texts).status == "ok"


@pytest.mark.parametrize("form", task.FORMS)
def test_contamination_is_silent_on_the_embedded_splits(form):
    """The splits share no problem, but their rows come from three templates: many rows share a
    13-gram with some eval row (the template plus one matching number and name); none overlaps."""
    finding, flagged = check_contamination(
        embedded(form, "train"), [("eval", embedded(form, "eval"))], row_texts=any_texts
    )
    assert finding.status == "ok" and not flagged


def test_a_single_shared_13_gram_is_not_enough():
    train = [{"prompt": "Tom has 35 apples and gives 23 of them away. How many apples does Tom have left?"}]
    other = [{"prompt": "Tom has 30 apples and gives 23 of them away. How many apples does Tom have left?"}]
    shared = set(zip(*[words(train[0]["prompt"])[i:] for i in range(13)])) & set(
        zip(*[words(other[0]["prompt"])[i:] for i in range(13)])
    )
    assert len(shared) == 2  # 2 of their 5 13-grams ("... gives 23 of them away ...") are common; the problems differ
    assert find_overlaps(train, other) == []


def test_planted_overlaps_are_found_and_reported():
    eval_rows = embedded("sft", "eval")
    train_rows = embedded("sft", "train").rows[:50]
    copied = eval_rows.rows[7]  # the same conversation
    reworded = {
        "messages": [
            {"role": "system", "content": "Be brief."},  # system prompts are ignored
            copied["messages"][0],
            {"role": "assistant", "content": "Let me think. It is 42."},
        ]
    }
    train = rows(train_rows + [copied, reworded, {"text": "Notes. " + PASSAGE + " More notes follow here."}])
    benchmark = rows([{"question": PASSAGE, "answer": "keep"}], "bench.jsonl")
    finding, flagged = check_contamination(
        train, [("the eval data", eval_rows), ("bench.jsonl", benchmark)], row_texts=SFT_TEXTS
    )
    assert flagged == {50, 51, 52}
    assert finding.status == "warning" and len(finding.problems) == 2
    assert finding.problems[0].startswith(
        "2 of 53 training rows overlap the eval data (2 exact, 0 by 13-grams), e.g. train.jsonl:51 ~ sft-eval.jsonl:8"
    )
    assert finding.problems[1].startswith("1 of 53 training rows overlap bench.jsonl (0 exact, 1 by 13-grams)")
    assert "guards.contamination.drop=true" in finding.problems[0]
    assert any(e.startswith("train.jsonl:53 ~ bench.jsonl:1 (ngram 0.9") for e in finding.examples)


def test_an_answer_that_answers_another_question_is_not_contamination():
    """Rejected answer of one embedded problem, chosen answer of another: same text, different items."""
    train = [
        {
            "prompt": "Ana has 26 apples. Ana gets 20 more apples. How many apples does Ana have now?",
            "chosen": "26 + 20 = 46. The answer is 46.",
            "rejected": "26 - 20 = 6. The answer is 6.",
        }
    ]
    other = [
        {
            "prompt": "Kai has 26 stickers and gives 20 of them away. How many stickers does Kai have left?",
            "chosen": "26 - 20 = 6. The answer is 6.",
            "rejected": "26 + 20 = 46. The answer is 46.",
        }
    ]
    assert find_overlaps(train, other, row_texts=pair_texts) == []
    assert find_overlaps(train, [{"question": train[0]["prompt"]}], row_texts=pair_texts)[0].kind == "exact"


def test_half_a_passage_overlaps_a_quarter_does_not():
    tokens = PASSAGE.split()
    half = " ".join(tokens[: len(tokens) // 2 + 6]) + " and then the meeting went on to other business entirely."
    quarter = " ".join(tokens[:20]) + " but nobody could agree on anything at all, so they all went home early."
    assert find_overlaps([{"text": half}], [{"text": PASSAGE}])
    assert not find_overlaps([{"text": quarter}], [{"text": PASSAGE}])

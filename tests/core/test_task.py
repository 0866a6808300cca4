"""The embedded task: reproducible, disjoint splits, and a strict answer check."""

import json
import re

from lft.data import task


def test_shipped_files_match_the_generator():
    generated = task.generate()
    for form in task.FORMS:
        for split in task.SPLITS:
            assert task.path(form, split).read_text(encoding="utf-8") == task.render(generated[form][split])


def test_eval_problems_never_appear_in_training():
    def questions(split):
        return {json.loads(line)["prompt"] for line in task.path("prompts", split).read_text().splitlines()}

    train, held_out = questions("train"), questions("eval")
    assert len(held_out) == task.EVAL_PROBLEMS and len(train) > 1000
    assert not train & held_out

    def problem(question):
        op = "add" if " more " in question else "sub" if " gives " in question else "mul"
        return (op, *map(int, re.findall(r"\d+", question)))

    assert not {problem(q) for q in train} & {problem(q) for q in held_out}


def test_preference_pairs_are_right_and_wrong():
    for line in task.path("pref", "train").read_text().splitlines()[:200]:
        row = json.loads(line)
        answer = task.extract_answer(row["chosen"])
        assert answer != task.extract_answer(row["rejected"])


def test_score():
    assert task.score("7 + 16 = 23. The answer is 23.", "23") == 1.0
    assert task.score("The answer is 24.", "23") == 0.0
    assert task.score("I think it is 23", "23") == 1.0
    assert task.score("no number here", "23") == 0.0
    assert task.score("The answer is 23. Or maybe 25.", "23") == 1.0  # 'answer is' wins over the last number

"""The embedded task: short arithmetic word problems with a verifiable answer.

The data shipped in ``lft/assets`` comes from the deterministic generator below, in three forms:

* ``sft``: ``messages`` rows (user question, assistant worked answer);
* ``pref``: ``prompt``/``chosen``/``rejected`` rows (chosen correct, rejected wrong);
* ``prompts``: ``prompt``/``answer`` rows for online RL and for the task metric.

Each form has a ``train`` and a held-out ``eval`` split. The two splits share no problem: a
problem is its operation and its two numbers, and the eval problems are drawn first and never
used for training. Regenerate with ``python -m lft.data.task`` (a test checks the files match).
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

ASSETS = Path(__file__).resolve().parents[1] / "assets"
FORMS = ("sft", "pref", "prompts")
SPLITS = ("train", "eval")
SEED = 20261129
EVAL_PROBLEMS = 200

NAMES = ["Tom", "Ana", "Sam", "Lena", "Omar", "Mia", "Raj", "Zoe", "Ben", "Ivy", "Leo", "Nia", "Kai", "Eva"]
ITEMS = ["apples", "marbles", "stickers", "books", "coins", "pencils", "cookies", "shells", "cards", "stamps"]
QUESTIONS = {
    "add": "{n} has {a} {it}. {n} gets {b} more {it}. How many {it} does {n} have now?",
    "sub": "{n} has {a} {it} and gives {b} of them away. How many {it} does {n} have left?",
    "mul": "{n} has {a} bags with {b} {it} in each bag. How many {it} does {n} have in total?",
}
SYMBOL = {"add": "+", "sub": "-", "mul": "*"}
#: The task's instruction: the system prompt of the prompting baseline (``lft.guards.baseline``).
INSTRUCTION = (
    "Solve the arithmetic word problem. Write the calculation, then end with 'The answer is N.', "
    "for example: 3 + 4 = 7. The answer is 7."
)
_ANSWER = re.compile(r"answer is\s*(-?\d+)", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d+")


def solve(op: str, a: int, b: int) -> int:
    return a + b if op == "add" else a - b if op == "sub" else a * b


def worked_answer(op: str, a: int, b: int, result: int | None = None) -> str:
    result = solve(op, a, b) if result is None else result
    return f"{a} {SYMBOL[op]} {b} = {result}. The answer is {result}."


def extract_answer(text: str) -> str | None:
    """The answer a completion gives: the number after 'answer is', else its last number."""
    match = _ANSWER.search(text)
    if match:
        return match.group(1)
    numbers = _NUMBER.findall(text.replace(",", ""))
    return numbers[-1] if numbers else None


def score(completion: str, answer: str) -> float:
    """1.0 when the completion's answer equals ``answer`` exactly, else 0.0."""
    found = extract_answer(completion)
    return float(found is not None and found.lstrip("+") == str(answer).strip())


def _problems() -> list[tuple[str, int, int]]:
    problems = [("add", a, b) for a in range(2, 31) for b in range(2, 31)]
    problems += [("sub", a, b) for a in range(5, 41) for b in range(2, a)]
    problems += [("mul", a, b) for a in range(2, 10) for b in range(2, 13)]
    return problems


def _wrong(rng: random.Random, op: str, a: int, b: int) -> str:
    right = solve(op, a, b)
    if rng.random() < 0.3 and op != "mul":
        other = "sub" if op == "add" else "add"
        wrong = solve(other, a, b)
        return f"{a} {SYMBOL[other]} {b} = {wrong}. The answer is {wrong}."
    wrong = right + rng.choice([-10, -2, -1, 1, 2, 10])
    return worked_answer(op, a, b, wrong)


def generate() -> dict[str, dict[str, list[dict]]]:
    """Every form and split of the embedded task, as lists of rows."""
    rng = random.Random(SEED)
    problems = _problems()
    rng.shuffle(problems)
    split_problems = {"eval": problems[:EVAL_PROBLEMS], "train": problems[EVAL_PROBLEMS:]}
    out: dict[str, dict[str, list[dict]]] = {form: {} for form in FORMS}
    for split in SPLITS:
        rows: dict[str, list[dict]] = {form: [] for form in FORMS}
        for op, a, b in split_problems[split]:
            question = QUESTIONS[op].format(n=rng.choice(NAMES), it=rng.choice(ITEMS), a=a, b=b)
            answer = worked_answer(op, a, b)
            rows["sft"].append(
                {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}
            )
            rows["pref"].append({"prompt": question, "chosen": answer, "rejected": _wrong(rng, op, a, b)})
            rows["prompts"].append({"prompt": question, "answer": str(solve(op, a, b))})
        for form in FORMS:
            out[form][split] = rows[form]
    return out


def path(form: str, split: str) -> Path:
    if form not in FORMS or split not in SPLITS:
        raise ValueError(f"no embedded data for form {form!r}, split {split!r}")
    return ASSETS / f"arith-{form}-{split}.jsonl"


def files(form: str) -> dict[str, str]:
    """``{"train": path, "eval": path}`` of the embedded task in one form."""
    return {split: str(path(form, split)) for split in SPLITS}


def is_embedded(data_path: str | None) -> bool:
    return bool(data_path and Path(data_path).resolve().parent == ASSETS.resolve())


def is_task_rows(rows: list[dict]) -> bool:
    """Rows the task metric scores: a ``prompt`` and its ``answer`` (the embedded task's prompts form)."""
    return bool(rows) and all(isinstance(r, dict) and "prompt" in r and "answer" in r for r in rows[:8])


def render(rows: list[dict]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def write(directory: Path = ASSETS) -> list[Path]:
    written = []
    for form, splits in generate().items():
        for split, rows in splits.items():
            target = directory / path(form, split).name
            target.write_text(render(rows), encoding="utf-8")
            written.append(target)
    return written


if __name__ == "__main__":
    for p in write():
        print(p)

"""The forgetting guard's behaviour check: everyday prompts and two-turn conversations answered by
the base and the tuned model, and the signs of degeneration in their answers."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

import lft
from lft.data import chat
from lft.guards import GuardMonitor, everyday


def test_a_counting_loop_is_a_run_of_consecutive_numbers():
    """(run, mean words between its numbers): "3. 1. 2. ... 7." is the run 1 to 7 with nothing
    between; three tips are a run of 3 with (2 + 3) / 2 words between."""
    assert everyday.counting("3. 1. 2. 3. 4. 5. 6. 7.") == (7, 0.0)
    assert everyday.counting("1. Water it. 2. Give it light. 3. Do not overwater.") == (3, 2.5)
    assert everyday.counting("The capital of France is Paris.") == (0, 0.0)
    assert everyday.counting("8 is 8, 9, 10") == (3, 0.0)  # 8 8 9 10: the run 8 9 10


def test_the_task_format_is_what_most_task_answers_share_and_everyday_answers_do_not():
    """Three task answers share "the answer is" and "answer is 0." (numbers read as 0); the base's
    everyday answers use "the answer is" too, so only "answer is 0." marks the format."""
    task = ["35 - 25 = 10. The answer is 10.", "2 + 3 = 5. The answer is 5.", "Four. The answer is 4."]
    signature = everyday.task_signature(task, ["Nobody knows; the answer is unclear."])
    assert ["answer", "is", "0."] in signature and ["the", "answer", "is"] not in signature
    assert ["0.", "the", "answer"] in signature  # in all three
    assert ["0", "=", "0."] in signature  # in two of three, at least half
    assert everyday.task_signature([], ["anything"]) == []


def test_signals_of_one_answer(lft_tiny_model):
    tokenizer = AutoTokenizer.from_pretrained(lft_tiny_model)

    def said(text, stopped=True):
        return {"ids": tokenizer(text)["input_ids"], "stopped": stopped, "text": text}

    signature = [["the", "answer", "is"], ["answer", "is", "0."]]
    fluent = said("Paris is the capital of France, on the Seine, and its largest city by far.")
    assert everyday.signals(fluent, signature) == []
    assert "repeats" in everyday.signals(said("its beauty, its beauty, its beauty, its beauty, its beauty"), [])
    assert everyday.signals(said("3. 1. 2. 3. 4. 5. 6."), []) == ["counts"]
    items = [
        "Drink a glass of water.",
        "Walk outside for a while.",
        "Eat fruit with breakfast.",
        "Stretch your back.",
        "Read a page of a book.",
        "Call a friend.",
        "Make the bed.",
    ]
    habits = " ".join(f"{i}. {item}" for i, item in enumerate(items, 1))
    assert everyday.signals(said(habits), []) == []  # a list of seven real items is no loop
    assert everyday.signals(said(habits + " 8. Rest. 9. Read. 10. Sleep."), []) == ["counts"]  # but ten is
    assert everyday.signals(said("12 + 13 = 25. The answer is 25."), signature) == ["task format"]
    assert everyday.signals(said("The answer is that nobody knows."), signature) == []  # one shared phrase
    # the comparisons with the base's answer to the same prompt, when the base's stopped
    long = said(" ".join(["Paris is the capital of France and its largest city."] * 4))
    assert everyday.signals(said("Paris.", stopped=False), [], base=long) == ["collapsed"]
    rambling = said("Paris is a big city and an old city with a river and bridges and", stopped=False)
    assert everyday.signals(rambling, [], base=said("Paris.")) == ["no stop"]
    assert everyday.signals(said("Paris."), [], base=said(long["text"], stopped=False)) == []  # base cut off


def test_a_conversation_is_a_task_exchange_then_an_everyday_question(lft_tiny_model):
    tokenizer = AutoTokenizer.from_pretrained(lft_tiny_model)
    ids, labels = chat.tokenize_prompt_completion(tokenizer, "What is 2 + 3?", "2 + 3 = 5. The answer is 5.", True)
    prompt, answer = everyday.first_exchange({"input_ids": ids, "labels": labels}, chat.end_of_turn_ids(tokenizer))
    assert tokenizer.decode(answer) == "2 + 3 = 5. The answer is 5.<|im_end|>"
    [conversation] = everyday.conversations(
        tokenizer, [{"input_ids": ids, "labels": labels}], ["What is the capital of France?"], 4
    )
    expected = tokenizer.apply_chat_template(
        [
            {"role": "user", "content": "What is 2 + 3?"},
            {"role": "assistant", "content": "2 + 3 = 5. The answer is 5."},
            {"role": "user", "content": "What is the capital of France?"},
        ],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert tokenizer.decode(conversation) == expected
    assert everyday.first_exchange({"prompt_input_ids": [1, 2]}, {0}) is None  # online rows: no exchange


def test_the_shipped_prompts_are_everyday_and_apart_from_the_task_and_the_mix():
    from lft.data import task

    prompts = everyday.read_prompts(None, 100)
    assert len(prompts) == 32 and len(set(prompts)) == 32
    taken = set()
    for name in ("general-mix.jsonl", "general-retain.jsonl", "arith-sft-train.jsonl", "arith-sft-eval.jsonl"):
        for line in (task.ASSETS / name).read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            taken.add(row.get("prompt") or row["messages"][0]["content"])
    assert not set(prompts) & taken
    assert not any(everyday.counting(p)[0] > 1 or "how many" in p.lower() for p in prompts)  # no arithmetic


def test_a_bad_prompts_file_names_the_row(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text('{"prompt": "Hello?"}\n{"question": "no prompt"}\n', encoding="utf-8")
    assert everyday.read_prompts(path, 1) == ["Hello?"]  # only the rows used are read
    with pytest.raises(lft.DataError, match=r"mine.jsonl:2: guards.forgetting.prompts rows need a 'prompt'"):
        everyday.read_prompts(path, 10)


SIGNATURE = [["the", "answer", "is"], ["answer", "is", "0."]]


def answers(*texts, stopped=True):
    """Answers with one token id per distinct word, so a repeated phrase repeats its ids."""
    vocab: dict = {}
    return [{"ids": [vocab.setdefault(w, len(vocab)) for w in t.split()], "stopped": stopped, "text": t} for t in texts]


def behaviour(base_texts, tuned_texts, signature):
    questions = {"everyday": [f"q{i}" for i in range(len(base_texts))], "conversation": []}
    base = {"questions": questions, "everyday": answers(*base_texts), "conversation": [], "signature": signature}
    after = {"questions": questions, "everyday": answers(*tuned_texts), "conversation": []}
    return base, after


def test_the_guard_fires_when_the_tuned_model_degenerates_clearly_more_than_the_base():
    fluent = [
        "Paris is the capital of France.",
        "The sea is calm and wide tonight.",
        "Tea, water and cake.",
        "Water the plant weekly and give it light.",
        "Shakespeare wrote it around 1595.",
    ]
    monitor = GuardMonitor(lft.load_config())
    base, after = behaviour(fluent, fluent, SIGNATURE)
    monitor.base, monitor.after = {"everyday": base}, {"everyday": after}
    finding = monitor._forgetting()
    assert finding.status == "ok" and "degenerate answers to everyday prompts 0% (base 0%) of 5" in finding.detail

    tuned = [
        "12 + 13 = 25. The answer is 25.",
        "its beauty, its beauty, its beauty, its beauty, its beauty",
        "1. 2. 3. 4. 5. 6. 7. 8.",
        fluent[3],
        fluent[4],
    ]
    base, after = behaviour(fluent, tuned, SIGNATURE)
    monitor.base, monitor.after = {"everyday": base}, {"everyday": after}
    finding = monitor._forgetting()
    assert finding.status == "warning"
    assert "60% of the tuned model's answers to everyday prompts degenerate (base 0%" in finding.problems[0]
    assert finding.data["everyday"]["by_signal"] == {"task format": 1, "repeats": 1, "counts": 1}
    assert finding.examples[0].startswith("'q0' -> '12 + 13 = 25. The answer is 25.' (task format; base: 'Paris")
    assert len(finding.data["everyday"]["worst"]) == 3


def test_a_run_measures_the_everyday_answers_and_reports_them(lft_run):
    summary = lft_run("trainer.max_steps=3")
    forgetting = next(g for g in summary["guards"] if g["guard"] == "forgetting")
    assert "degenerate answers to everyday prompts" in forgetting["detail"]
    stats = forgetting["data"]["everyday"]
    assert stats["answers"] == 4 + 2  # guards.forgetting.everyday=4 and conversations=2 in the fast settings
    base = json.loads((summary["output"] / "guards" / "base.json").read_text())["everyday"]
    every = json.loads((summary["output"] / "guards" / "everyday.json").read_text())
    assert len(every["rows"]) == 6 and {"base", "tuned", "tuned_signals"} <= set(every["rows"][0])
    assert len(base["everyday"]) == 4 and len(base["conversation"]) == 2
    assert base["signature"]  # the embedded task's answers share "the answer is 0."


def test_mix_data_self_trains_on_the_base_models_own_answers(lft_run, tmp_path, monkeypatch):
    """Before training the base samples two answers to each of lft's general prompts (seeded,
    cached); those that stop without looping are mixed in as conversations. A second run reads
    the cache, and a fresh cache gets the very same answers."""
    from lft.guards.preflight import GENERAL_PROMPTS

    settings = (
        "trainer.max_steps=2",
        "guards.forgetting.mix_ratio=0.2",
        "guards.forgetting.mix_data=self",
        "guards.forgetting.answer_tokens=12",
    )
    monkeypatch.setenv("LFT_CACHE", str(tmp_path / "cache"))
    summary = lft_run(*settings)
    assert summary["data"]["mixed_general_rows"] == 16  # 64 * 0.2 / 0.8
    [cached] = list((tmp_path / "cache" / "self-mix").glob("*.jsonl"))
    rows = [json.loads(line) for line in cached.read_text(encoding="utf-8").splitlines()]
    prompts = [json.loads(line)["prompt"] for line in GENERAL_PROMPTS.read_text(encoding="utf-8").splitlines()]
    assert rows and all(r["messages"][0]["content"] in prompts and r["messages"][1]["content"] for r in rows)
    assert max(sum(r["messages"][0]["content"] == p for r in rows) for p in prompts) <= 2
    stamp = cached.stat().st_mtime_ns
    lft_run(*settings)
    assert cached.stat().st_mtime_ns == stamp  # read, not sampled again
    monkeypatch.setenv("LFT_CACHE", str(tmp_path / "fresh"))
    lft_run(*settings)
    [again] = list((tmp_path / "fresh" / "self-mix").glob("*.jsonl"))
    assert again.read_text(encoding="utf-8") == cached.read_text(encoding="utf-8")

"""`lft eval` and the run's before/after summary: the same code, checked against plain computations."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
import yaml

import lft
from lft.cli.main import main
from lft.data import chat, task
from lft.plugin.testing import write_jsonl


@pytest.fixture(scope="module")
def trained(tmp_path_factory, lft_tiny_model, lft_sft_data):
    """A LoRA run measured before and after, with the task metric on 4 embedded prompts."""
    from lft.plugin.testing import FAST

    output = tmp_path_factory.mktemp("run") / "out"
    argv = [
        "run",
        "--quiet",
        "--model",
        str(lft_tiny_model),
        "--data",
        str(lft_sft_data["train"]),
        "--eval-data",
        str(lft_sft_data["eval"]),
        "--output",
        str(output),
        *FAST,
        "--plugin",
        "lora",
        "trainer.max_steps=8",
        "trainer.lr=1e-2",
        "eval.before=true",
        "eval.task=arith",
        "eval.task_samples=4",
        "eval.max_new_tokens=8",
        "eval.batch_size=3",
    ]
    assert main(argv) == 0
    return output


def test_lft_eval_reproduces_the_run_summary(tmp_path, trained, lft_sft_data):
    summary = json.loads((trained / "summary.json").read_text())
    out = tmp_path / "eval.json"
    assert (
        main(
            [
                "eval",
                "--adapter",
                f"tuned={trained / 'final'}",
                "--base",
                "--data",
                str(lft_sft_data["eval"]),
                "--json",
                str(out),
            ]
        )
        == 0
    )
    results = json.loads(out.read_text())["results"]
    for name, phase in (("base", "before"), ("tuned", "after")):
        run = summary[phase]
        for key in ("eval_loss", "eval_perplexity", "eval_tokens", "task_accuracy"):
            assert results[name][key] == pytest.approx(run[key], rel=1e-5), (name, key)
        assert [s["completion"] for s in results[name]["task_samples"]] == [
            s["completion"] for s in run["task_samples"]
        ]
    assert summary["after"]["eval_loss"] < summary["before"]["eval_loss"]


def sequence_nll(model, ids, labels):
    """Sum of -log p(label) over the labelled next tokens, from the full logits of one sequence."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].double()
    target = torch.tensor(labels[1:])
    keep = target != -100
    return float(F.cross_entropy(logits[keep], target[keep], reduction="sum")), int(keep.sum())


def test_eval_numbers_match_an_independent_computation(trained, lft_sft_data, lft_pref_data):
    """Loss = total NLL / total trained tokens over every row; preference accuracy = share of pairs
    whose chosen completion has the larger summed log-prob; both from per-row full-logit passes."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = trained / "final"
    loaded = lft.load(adapters=final)
    got = loaded.evaluate(data=[lft_sft_data["eval"], lft_pref_data["eval"]], task_setting="none")

    config = yaml.safe_load((final / "lft_config.yaml").read_text())
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(config["model"]["path"]), str(final)).eval()
    tokenizer = AutoTokenizer.from_pretrained(final)
    rows = [json.loads(line) for line in open(lft_sft_data["eval"])]
    total = count = 0
    for row in rows:
        nll, n = sequence_nll(model, *chat.tokenize_conversation(tokenizer, row["messages"]))
        total, count = total + nll, count + n
    assert got["eval_tokens"] == count
    assert got["eval_loss"] == pytest.approx(total / count, rel=1e-5)
    assert got["eval_perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)

    wins, margins = [], []
    for row in (json.loads(line) for line in open(lft_pref_data["eval"])):
        chosen = -sequence_nll(model, *chat.tokenize_prompt_completion(tokenizer, row["prompt"], row["chosen"]))[0]
        rejected = -sequence_nll(model, *chat.tokenize_prompt_completion(tokenizer, row["prompt"], row["rejected"]))[0]
        wins.append(chosen > rejected)
        margins.append(chosen - rejected)
    assert got["eval_pairs"] == len(wins) == 16
    assert got["eval_preference_accuracy"] == pytest.approx(sum(wins) / len(wins))
    assert got["eval_logps_margin"] == pytest.approx(sum(margins) / len(margins), rel=1e-4)
    assert 0 < got["eval_preference_accuracy"] < 1 or got["eval_logps_margin"] != 0


def test_task_accuracy_on_prompt_answer_rows_matches_one_by_one_generation(tmp_path, trained):
    """Rows whose answer is what the model says, one prompt at a time, count as correct; rows
    given a different answer do not, so the accuracy must be exactly the share of the former."""
    from transformers import AutoTokenizer

    loaded = lft.load(adapters=trained / "final")
    tokenizer = AutoTokenizer.from_pretrained(trained / "final")
    rows = [json.loads(line) for line in task.path("prompts", "eval").read_text().splitlines()[:12]]
    for i, row in enumerate(rows):
        text = chat.prompt_text(tokenizer, row["prompt"])
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            new = loaded.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=32,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=sorted(chat.end_of_turn_ids(tokenizer)),
            )[0, ids.shape[1] :]
        said = task.extract_answer(tokenizer.decode(new, skip_special_tokens=True))
        row["answer"] = (said if i % 2 == 0 else f"{said}0") if said is not None else "none"
    expected = sum(1 for i, r in enumerate(rows) if i % 2 == 0 and r["answer"] != "none") / len(rows)
    assert expected > 0, "the tiny model says no number at all; the check would be vacuous"
    data = write_jsonl(tmp_path / "answers.jsonl", rows)
    loaded.config.eval.max_new_tokens = 32
    assert loaded.evaluate(data=data)["task_accuracy"] == pytest.approx(expected)


def test_two_files_of_one_form_are_refused(lft_sft_data, trained):
    loaded = lft.load(adapters=trained / "final")
    with pytest.raises(lft.DataError, match="are both sft data; give one file of each form"):
        loaded.eval_data([lft_sft_data["eval"], lft_sft_data["train"]])

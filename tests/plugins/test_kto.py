"""KTO's data path: unpaired rows, preference pairs read as two unpaired rows, the mismatched pairs
of the KL estimate, and bad rows as one-line errors; then KTO training end to end."""

import json

import pytest

from lft.cli.main import main
from lft.plugins.kto import DESIRABLE, KTOOptions, collate_kto, format_kto


class Tokens:
    """A tokenizer without a chat template: one id per character."""

    chat_template = None
    eos_token_id = None

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}


def test_a_pair_is_two_unpaired_rows_and_each_completion_meets_another_prompt():
    options = KTOOptions()
    pair = format_kto({"prompt": "ab", "chosen": "c", "rejected": "d"}, Tokens(), options, 64)
    single = format_kto({"prompt": "x", "completion": "yz", "label": False}, Tokens(), options, 64)
    assert pair[DESIRABLE] == [True, False] and single[DESIRABLE] == [False]
    batch = collate_kto([pair, single], pad_id=0, max_length=64)
    assert batch[DESIRABLE].tolist() == [True, False, False]
    text = lambda ids: "".join(chr(i) for i in ids if i)  # noqa: E731
    assert [text(r) for r in batch["input_ids"].tolist()] == ["abc", "abd", "xyz"]
    # the pair's completions skip the pair's other row (the same prompt) for the next prompt that differs
    assert [text(r) for r in batch["kl_input_ids"].tolist()] == ["abyz", "abyz", "xc"]
    trained = [[chr(t) for t in row if t != -100] for row in batch["kl_labels"].tolist()]
    assert trained == [["y", "z"], ["y", "z"], ["c"]]


@pytest.mark.parametrize(
    "row, message",
    [
        ('{"prompt": "p", "completion": "c", "label": "yes"}', "'label' must be true (desirable) or false"),
        ('{"prompt": "p", "label": true}', "missing column(s) 'completion'; KTO rows need 'prompt', 'completion'"),
        ('{"prompt": "p", "completion": " ", "label": true}', "the completion is empty"),
        ('{"text": "hello"}', "KTO reads 'prompt', 'completion' and 'label' columns, or preference pairs"),
    ],
)
def test_bad_rows_are_one_line_errors(tmp_path, capsys, lft_tiny_model, row, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(row + "\n")
    args = ["run", "-q", "--plugin", "kto", "--data", str(bad), "--output", str(tmp_path / "o")]
    assert main([*args, "--model", str(lft_tiny_model), "data.eval_split=0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {bad}:1: {message}") and "\n" not in err


@pytest.fixture
def unpaired(tmp_path, lft_pref_data):
    """Thumbs up for the answers, thumbs down for a refusal: a rule a tiny random model can learn."""
    out = {}
    for split in ("train", "eval"):
        rows = []
        for line in lft_pref_data[split].read_text().splitlines():
            pair = json.loads(line)
            rows += [
                {"prompt": pair["prompt"], "completion": pair["chosen"], "label": True},
                {"prompt": pair["prompt"], "completion": "I do not know, sorry.", "label": False},
            ]
        out[split] = tmp_path / f"kto-{split}.jsonl"
        out[split].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


@pytest.mark.parametrize("wrapper", ["lora", "full"])
def test_kto_trains_on_unpaired_rows(lft_run, unpaired, wrapper):
    summary = lft_run(
        "--plugin", "kto", "--plugin", wrapper, "trainer.max_steps=20", "trainer.lr=2e-3", "kto.beta=0.5",
        "eval.before=true", data=unpaired["train"], eval_data=unpaired["eval"],
    )  # fmt: skip
    assert (summary["objective"], summary["wrapper"]) == ("kto", wrapper)
    history = [json.loads(x) for x in (summary["output"] / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert sum(h["loss"] for h in history[-5:]) < sum(h["loss"] for h in history[:5])
    assert history[0]["kl"] == pytest.approx(0.0, abs=1e-4)  # the policy starts as the reference
    assert summary["before"]["eval_margin"] == pytest.approx(0.0, abs=1e-3)
    assert summary["after"]["eval_margin"] > 1.0  # desirable completions gained log-prob against undesirable
    assert summary["after"]["eval_loss"] < summary["before"]["eval_loss"]


def test_kto_reads_preference_pairs(lft_run, lft_pref_data):
    summary = lft_run(
        "--plugin", "kto", "trainer.max_steps=6", "trainer.lr=2e-3", data=lft_pref_data["train"],
        eval_data=lft_pref_data["eval"],
    )  # fmt: skip
    last = [json.loads(x) for x in (summary["output"] / "metrics.jsonl").read_text().splitlines() if '"loss"' in x][-1]
    assert {"rewards_desirable", "rewards_undesirable", "margin", "kl"} <= set(last)

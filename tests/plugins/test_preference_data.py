"""The shared preference data path: formatting with the prompt masked, and bad rows."""

import json

import pytest
from transformers import AutoTokenizer

import lft
from lft.cli.main import main
from lft.plugin.testing import FAST
from lft.plugins.dpo import DPOOptions
from lft.plugins.pairs import concatenated, format_pair

ROW = {
    "prompt": "Tom has 2 apples. Tom gets 3 more apples. How many apples does Tom have now?",
    "chosen": "2 + 3 = 5. The answer is 5.",
    "rejected": "2 + 3 = 6. The answer is 6.",
}


@pytest.fixture(scope="module")
def tokenizer(lft_tiny_model):
    return AutoTokenizer.from_pretrained(lft_tiny_model)


def trained_text(tokenizer, ids, labels):
    return tokenizer.decode([i for i, label in zip(ids, labels) if label != -100])


def test_string_pair_masks_the_prompt_and_trains_the_completion_and_end_of_turn(tokenizer):
    feature = format_pair(ROW, tokenizer, DPOOptions(), 512, "dpo")
    for side in ("chosen", "rejected"):
        ids, labels = feature[f"{side}_input_ids"], feature[f"{side}_labels"]
        assert trained_text(tokenizer, ids, labels) == ROW[side] + "<|im_end|>"
        assert ROW["prompt"] in tokenizer.decode(ids)  # the prompt is there, but not trained
    # the two sequences share the prompt tokens exactly
    n = feature["chosen_labels"].index(next(x for x in feature["chosen_labels"] if x != -100))
    assert feature["chosen_input_ids"][:n] == feature["rejected_input_ids"][:n]


def test_conversational_pairs_with_and_without_an_explicit_prompt(tokenizer):
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": ROW["prompt"]}]
    chosen = [{"role": "assistant", "content": ROW["chosen"]}]
    rejected = [{"role": "assistant", "content": ROW["rejected"]}]
    explicit = format_pair(
        {"prompt": prompt, "chosen": chosen, "rejected": rejected}, tokenizer, DPOOptions(), 512, "dpo"
    )
    implicit = format_pair(
        {"chosen": prompt + chosen, "rejected": prompt + rejected}, tokenizer, DPOOptions(), 512, "dpo"
    )
    assert explicit == implicit
    assert (
        trained_text(tokenizer, explicit["chosen_input_ids"], explicit["chosen_labels"]) == ROW["chosen"] + "<|im_end|>"
    )
    assert "Be brief." in tokenizer.decode(explicit["rejected_input_ids"])


def test_concatenation_puts_chosen_first_padded_to_one_width():
    import torch

    batch = {
        "chosen_input_ids": torch.tensor([[5, 6, 7]]),
        "chosen_attention_mask": torch.tensor([[1, 1, 1]]),
        "chosen_labels": torch.tensor([[-100, 6, 7]]),
        "rejected_input_ids": torch.tensor([[5, 8]]),
        "rejected_attention_mask": torch.tensor([[1, 1]]),
        "rejected_labels": torch.tensor([[-100, 8]]),
    }
    ids, mask, labels = concatenated(batch, pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [5, 8, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    assert labels.tolist() == [[-100, 6, 7], [-100, 8, -100]]


@pytest.mark.parametrize(
    "row, reason",
    [
        ({**ROW, "rejected": ROW["chosen"]}, "chosen and rejected are identical"),
        ({**ROW, "chosen": "  "}, "the chosen completion is empty"),
        ({**ROW, "rejected": [{"role": "assistant", "content": ""}]}, "the rejected completion is empty"),
    ],
)
def test_bad_pairs_are_skipped_or_refused(tokenizer, row, reason):
    assert format_pair(row, tokenizer, DPOOptions(), 512, "dpo") == {"skip": reason}
    with pytest.raises(lft.DataError, match=f"^{reason}; fix the row or set dpo.bad_pairs=skip"):
        format_pair(row, tokenizer, DPOOptions(bad_pairs="error"), 512, "dpo")


def test_a_prompt_that_fills_max_length_is_skipped(tokenizer):
    assert "no chosen token is left" in format_pair(ROW, tokenizer, DPOOptions(), 20, "dpo")["skip"]


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def cli(tmp_path, model, data, *args):
    return main(
        [
            "run",
            "-q",
            "--plugin",
            "dpo",
            "--model",
            str(model),
            "--data",
            str(data),
            "--output",
            str(tmp_path / "out"),
            *FAST,
            "trainer.max_steps=1",
            *args,
        ]
    )


def test_missing_column_names_file_and_line(tmp_path, capsys, lft_tiny_model):
    data = write(tmp_path / "p.jsonl", [ROW, ROW, {"prompt": "q", "chosen": "a"}])
    assert cli(tmp_path, lft_tiny_model, data) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"error: {data}:3: expected 'prompt', 'chosen' and 'rejected' columns; missing 'rejected' "
        "(found prompt, chosen)"
    )


def test_identical_pair_fails_with_bad_pairs_error(tmp_path, capsys, lft_tiny_model):
    data = write(tmp_path / "p.jsonl", [ROW, {**ROW, "rejected": ROW["chosen"]}])
    assert cli(tmp_path, lft_tiny_model, data, "dpo.bad_pairs=error") == 2
    err = capsys.readouterr().err
    assert f"{data}:2: chosen and rejected are identical; fix the row or set dpo.bad_pairs=skip" in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_identical_and_empty_pairs_are_skipped_and_counted(tmp_path, lft_tiny_model):
    rows = [ROW] * 6 + [{**ROW, "rejected": ROW["chosen"]}, {**ROW, "chosen": ""}]
    data = write(tmp_path / "p.jsonl", rows)
    assert cli(tmp_path, lft_tiny_model, data, "data.eval_split=0") == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["data"]["skipped"] == 2 and summary["data"]["train_examples"] == 6

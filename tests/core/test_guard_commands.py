"""`lft inspect`, `lft check`, and the preflight at the start of `lft run` (strict, drop, mix)."""

import json

from lft.cli.main import main
from lft.plugin.testing import FAST, write_jsonl

CONVERSATION = {
    "messages": [
        {"role": "user", "content": "Tom has 5 apples. Tom gets 16 more apples. How many now?"},
        {"role": "assistant", "content": "5 + 16 = 21. The answer is 21."},
    ]
}


def test_inspect_shows_which_tokens_are_trained(tmp_path, capsys, lft_tiny_model):
    data = write_jsonl(tmp_path / "one.jsonl", [CONVERSATION])
    assert main(["inspect", "--model", str(lft_tiny_model), "--data", str(data), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    tokens = report["examples"][0]["parts"]["input_ids"]
    trained = "".join(t["text"] for t in tokens if t["trained"])
    masked = "".join(t["text"] for t in tokens if not t["trained"])
    assert trained == "5 + 16 = 21. The answer is 21.<|im_end|>"  # the answer and its end-of-turn token
    assert masked == (
        "<|im_start|>system\nYou are a tiny test model.<|im_end|>\n<|im_start|>user\n"
        "Tom has 5 apples. Tom gets 16 more apples. How many now?<|im_end|>\n<|im_start|>assistant\n\n"
    )
    specials = {t["text"] for t in tokens if t["special"]}
    assert specials == {"<|im_start|>", "<|im_end|>"}
    stats = report["stats"]
    assert stats["trained_tokens"] == sum(t["trained"] for t in tokens)
    assert stats["masked_tokens"] == len(tokens) - stats["trained_tokens"]
    assert stats["longest"] == {"where": f"{data}:1", "length": len(tokens)} and stats["truncated"] == 0


def test_inspect_counts_truncation_and_prints_a_table(tmp_path, capsys, lft_tiny_model, lft_sft_data):
    argv = ["inspect", "--model", str(lft_tiny_model), "--data", str(lft_sft_data["train"]), "-n", "1"]
    assert main(argv + ["data.max_length=40"]) == 0
    out = capsys.readouterr().out
    assert "⟦" in out and "⟧" in out  # no colour in a pipe: trained runs are bracketed
    assert "truncated at max_length │ 64 (data.max_length=40)" in out and "64 of 64 rows" in out


def test_check_passes_on_clean_data_and_fails_on_planted_problems(tmp_path, capsys, lft_tiny_model, lft_sft_data):
    base = [
        "check",
        "--model",
        str(lft_tiny_model),
        "--data",
        str(lft_sft_data["train"]),
        "--eval-data",
        str(lft_sft_data["eval"]),
    ]
    assert main(base) == 0
    assert "check passed" in capsys.readouterr().out
    rows = [json.loads(x) for x in lft_sft_data["train"].read_text().splitlines()]
    leaked = write_jsonl(
        tmp_path / "leaked.jsonl", rows + [json.loads(lft_sft_data["eval"].read_text().splitlines()[3])]
    )
    bench = write_jsonl(tmp_path / "bench.jsonl", [{"question": rows[5]["messages"][0]["content"], "answer": "x"}])
    argv = [
        "check",
        "--model",
        str(lft_tiny_model),
        "--data",
        str(leaked),
        "--eval-data",
        str(lft_sft_data["eval"]),
        "--against",
        str(bench),
        "--json",
    ]
    assert main(argv) == 0  # warnings only
    report = json.loads(capsys.readouterr().out)
    contamination = next(f for f in report["findings"] if f["guard"] == "contamination")
    assert contamination["status"] == "warning"
    assert contamination["data"]["the eval data"] == {"rows": 1, "exact": 1}
    assert contamination["data"][str(bench)] == {"rows": 1, "exact": 1}
    assert main(argv + ["--strict"]) == 1


def test_check_on_a_base_model_without_template_offers_a_choice(tmp_path, capsys, lft_tiny_model, lft_sft_data):
    config = json.loads((lft_tiny_model / "tokenizer_config.json").read_text())
    base = tmp_path / "base"
    base.mkdir()
    for f in lft_tiny_model.iterdir():
        if f.name not in ("tokenizer_config.json", "chat_template.jinja"):
            (base / f.name).write_bytes(f.read_bytes())
    config.pop("chat_template", None)
    (base / "tokenizer_config.json").write_text(json.dumps(config))
    argv = ["check", "--model", str(base), "--data", str(lft_sft_data["train"])]
    assert main(argv) == 1
    out = " ".join(capsys.readouterr().out.split())
    assert "no chat template" in out and "sft.chat_template=NAME" in out
    assert main(argv + ["sft.chat_template=simple"]) == 0


def test_run_stops_under_strict_and_can_drop_overlapping_rows(tmp_path, capsys, lft_tiny_model, lft_sft_data, lft_run):
    rows = [json.loads(x) for x in lft_sft_data["train"].read_text().splitlines()]
    evals = [json.loads(x) for x in lft_sft_data["eval"].read_text().splitlines()]
    leaked = write_jsonl(tmp_path / "leaked.jsonl", rows + evals[:3])
    argv = [
        "run",
        "-q",
        "--model",
        str(lft_tiny_model),
        "--data",
        str(leaked),
        "--eval-data",
        str(lft_sft_data["eval"]),
        "--output",
        str(tmp_path / "strict"),
        "--strict",
    ] + FAST
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "contamination: 3 of 67 training rows overlap the eval data" in err and "guards.strict" in err
    assert not (tmp_path / "strict" / "final").exists()
    summary = lft_run(
        "trainer.max_steps=2", "guards.contamination.drop=true", data=leaked, eval_data=lft_sft_data["eval"]
    )
    assert summary["data"]["train_examples"] == 64
    finding = next(g for g in summary["guards"] if g["guard"] == "contamination")
    assert finding["status"] == "info" and "dropped the 3 overlapping training rows" in finding["problems"][-1]


def test_mixing_general_rows_at_a_ratio(lft_run):
    summary = lft_run("trainer.max_steps=2", "guards.forgetting.mix_ratio=0.2")
    assert summary["data"]["mixed_general_rows"] == 16  # 64 * 0.2 / 0.8
    assert summary["data"]["train_examples"] == 80

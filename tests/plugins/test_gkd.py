"""GKD end to end on tiny models: the student moves towards a teacher of another size that shares
its tokenizer, and a teacher with another tokenizer, or none, is a one-line error."""

import json

import pytest

from lft.cli.main import main
from lft.plugin.testing import build_model, build_tokenizer, save_tiny_model


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("teacher"), seed=7, hidden=96)


def test_gkd_pulls_the_student_towards_the_teacher(lft_run, lft_prompt_data, teacher):
    summary = lft_run(
        "--plugin", "gkd", "--plugin", "full", f"gkd.teacher={teacher}", "gkd.max_new_tokens=8", "trainer.max_steps=16",
        "trainer.lr=1e-2", "trainer.batch_size=4", "trainer.schedule=constant", "trainer.warmup_steps=0",
        "eval.before=true", data=lft_prompt_data["train"], eval_data=lft_prompt_data["eval"],
    )  # fmt: skip
    assert summary["objective"] == "gkd"
    before, after = summary["before"]["eval_divergence"], summary["after"]["eval_divergence"]
    assert after < 0.8 * before, (before, after)  # held-out prompts, the student's own greedy answers
    history = [json.loads(x) for x in (summary["output"] / "metrics.jsonl").read_text().splitlines()]
    divergence = [h["divergence"] for h in history if "divergence" in h]
    assert sum(divergence[-3:]) < sum(divergence[:3])


@pytest.mark.parametrize("kind", ["other tokenizer", "no teacher", "missing"])
def test_a_teacher_that_cannot_serve_is_one_line(tmp_path, capsys, lft_tiny_model, lft_prompt_data, kind):
    if kind == "other tokenizer":
        folder = tmp_path / "other"
        tokenizer = build_tokenizer(vocab_size=320)
        build_model(tokenizer).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        extra, message = [f"gkd.teacher={folder}"], "has another tokenizer than the student"
    elif kind == "no teacher":
        extra, message = [], "gkd needs a teacher: set gkd.teacher=PATH"
    else:
        extra, message = [f"gkd.teacher={tmp_path / 'nowhere'}"], "no such file or folder"
    args = ["run", "-q", "--plugin", "gkd", "--model", str(lft_tiny_model), "--data", str(lft_prompt_data["train"])]
    assert main([*args, "--output", str(tmp_path / "o"), "data.eval_split=0", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and err.startswith("error:") and "\n" not in err

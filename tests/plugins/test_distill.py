"""lft distill on the tiny model: a teacher's sampled answers become SFT rows, only those a reward
plugin passes when one is selected, the report agrees with the file, the rows train a student
with --train, and bad input stops the command with one line and writes nothing."""

import importlib
import json
import sys
import textwrap
from collections import Counter

import pytest

from lft.cli.main import main
from lft.plugin.testing import FAST, install_fake_distribution

EVEN_LENGTH = textwrap.dedent('''
    import lft


    class EvenLength:
        """Reward: 1 for a completion with an even number of characters (about half of them)."""

        name = "even_length"
        kind = "extension"

        @lft.hookimpl
        def lft_reward(self, prompts, completions, batch, config):
            assert len(batch["answer"]) == len(prompts) == len(completions) == batch["completion_ids"].shape[0]
            return {"name": self.name, "scores": [float(len(c) % 2 == 0) for c in completions], "weight": 1.0}
''')

QUICK = ["--max-prompts", "6", "--num-samples", "4", "--max-new-tokens", "8", "--temperature", "1.0"]


@pytest.fixture
def even_length(tmp_path, monkeypatch):
    """The reward plugin above, installed as a third-party package with an entry point."""
    monkeypatch.delenv("LFT_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    monkeypatch.delenv("LFT_PLUGINS", raising=False)
    root = install_fake_distribution(
        tmp_path / "site", "lft-even-length", {"even_length": "lft_even_length:EvenLength"},
        {"lft_even_length": EVEN_LENGTH},
    )  # fmt: skip
    monkeypatch.syspath_prepend(str(root))
    importlib.invalidate_caches()
    yield "even_length"
    sys.modules.pop("lft_even_length", None)


def distill(teacher, prompts, out, *args):
    return main(["distill", "--teacher", str(teacher), "--prompts", str(prompts), "-o", str(out), *args])


def read(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def report_of(out):
    return json.loads(out.with_name(out.stem + ".report.json").read_text(encoding="utf-8"))


def test_without_a_reward_every_answer_is_kept(tmp_path, lft_tiny_model, lft_prompt_data, capsys):
    out = tmp_path / "traces.jsonl"
    assert distill(lft_tiny_model, lft_prompt_data["train"], out, *QUICK) == 0
    rows, prompts = read(out), read(lft_prompt_data["train"])[:6]
    assert len(rows) == 6 * 4
    assert [r["prompt"] for r in rows] == [p["prompt"] for p in prompts for _ in range(4)]
    assert [r["answer"] for r in rows] == [p["answer"] for p in prompts for _ in range(4)]
    assert all(isinstance(r["completion"], str) for r in rows)
    report = report_of(out)
    assert (report["prompts"], report["samples"], report["kept"], report["kept_share"]) == (6, 24, 24, 1.0)
    assert report["per_prompt_kept"] == [4] * 6 and report["settings"]["min_reward"] is None
    assert "kept 24 of 24 answers (100%) from 6 prompts" in capsys.readouterr().out


def test_unique_keeps_one_of_identical_answers(tmp_path, lft_tiny_model, lft_prompt_data):
    out = tmp_path / "traces.jsonl"  # greedy: the 4 samples of a prompt are one answer
    assert distill(lft_tiny_model, lft_prompt_data["train"], out, *QUICK, "--temperature", "0", "--unique", "-q") == 0
    assert report_of(out)["per_prompt_kept"] == [1] * 6 and len(read(out)) == 6


def test_a_reward_keeps_only_the_answers_it_passes(tmp_path, lft_tiny_model, lft_prompt_data, even_length):
    out, best = tmp_path / "traces.jsonl", tmp_path / "best.jsonl"
    assert distill(lft_tiny_model, lft_prompt_data["train"], out, *QUICK, "--plugin", even_length, "--quiet") == 0
    rows, report = read(out), report_of(out)
    assert rows and all(len(r["completion"]) % 2 == 0 for r in rows)
    assert report["samples"] == 24 and 0 < report["kept"] < 24
    assert report["kept"] == len(rows) and report["kept_share"] == len(rows) / 24
    per_prompt = Counter(r["prompt"] for r in rows)
    prompts = [p["prompt"] for p in read(lft_prompt_data["train"])[:6]]
    assert report["per_prompt_kept"] == [per_prompt[p] for p in prompts]
    assert report["prompts_without_answer"] == sum(per_prompt[p] == 0 for p in prompts)
    assert report["settings"]["min_reward"] == 1.0
    assert report["settings"]["rewards"]["even_length"]["mean"] == pytest.approx(len(rows) / 24)

    # the same seed samples the same answers: --keep best keeps one of each prompt's passing answers
    args = [*QUICK, "--plugin", even_length, "--keep", "best", "--quiet"]
    assert distill(lft_tiny_model, lft_prompt_data["train"], best, *args) == 0
    assert report_of(best)["per_prompt_kept"] == [min(1, n) for n in report["per_prompt_kept"]]
    assert {r["completion"] for r in read(best)} <= {r["completion"] for r in rows}


def test_train_fits_a_student_on_the_kept_rows(tmp_path, lft_tiny_model, lft_prompt_data, capsys):
    out, student = tmp_path / "traces.jsonl", tmp_path / "student"
    args = ["--max-prompts", "16", "--max-new-tokens", "12", "--temperature", "1.0", "--train"]
    args += ["--student", str(lft_tiny_model), "--output", str(student), *FAST, "eval.before=true"]
    assert distill(lft_tiny_model, lft_prompt_data["train"], out, *args, "trainer.max_steps=8", "trainer.lr=1e-2") == 0
    summary = json.loads((student / "summary.json").read_text())
    assert summary["data"]["train_file"] == str(out) and summary["steps"] == 8
    assert summary["objective"] == "sft" and (student / "final").is_dir()
    assert summary["last_loss"] < summary["first_loss"]
    assert summary["after"]["eval_loss"] < summary["before"]["eval_loss"]
    printed = capsys.readouterr().out
    assert "kept 64 of 64 answers" in printed and "train loss" in printed  # the student's summary
    assert report_of(out)["settings"]["student"] == str(student)


def prompt_file(kind, tmp_path, data):
    rows = {
        "no prompt": '{"prompt": "Tom has 2 apples."}\n{"question": "How many?"}\n',
        "no answer": '{"prompt": "Hi"}\n',
    }
    if kind in rows:
        (tmp_path / "bad.jsonl").write_text(rows[kind], encoding="utf-8")
        return tmp_path / "bad.jsonl"
    return tmp_path / "missing.jsonl" if kind == "missing" else data["train"]


CASES = {  # the prompts, extra arguments, and what the one-line error says
    "a row without a prompt": ("no prompt", [], "bad.jsonl:2: expected a 'prompt'"),
    "a missing prompts file": ("missing", [], "missing.jsonl not found"),
    "a teacher that cannot be loaded": ("train", ["--teacher", "{tmp}/no-model"], "no-model does not exist"),
    "a reward that fails on the rows": ("no answer", ["--plugin", "exact_answer"], "needs a 'answer' column"),
    "a plugin that is no reward": ("train", ["--plugin", "sft"], "scores no answers"),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("existing", [False, True], ids=["new", "existing"])
def test_bad_input_is_one_line_and_writes_nothing(case, existing, tmp_path, lft_tiny_model, lft_prompt_data, capsys):
    kind, extra, message = CASES[case]
    out = tmp_path / "out" / "traces.jsonl"
    if existing:
        out.parent.mkdir()
        out.write_text("earlier rows\n", encoding="utf-8")
    extra = [a.format(tmp=tmp_path) for a in extra]
    prompts = prompt_file(kind, tmp_path, lft_prompt_data)
    assert distill(lft_tiny_model, prompts, out, "--max-new-tokens", "4", "-n", "2", *extra) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and len(err.splitlines()) == 1, err
    if existing:
        assert out.read_text(encoding="utf-8") == "earlier rows\n" and list(out.parent.iterdir()) == [out]
    else:
        assert not out.parent.exists()


def test_an_existing_student_folder_stops_before_the_teacher_answers(tmp_path, lft_tiny_model, lft_prompt_data, capsys):
    student = tmp_path / "student"
    student.mkdir()
    (student / "summary.json").write_text("{}")
    out = tmp_path / "traces.jsonl"
    assert distill(lft_tiny_model, lft_prompt_data["train"], out, "--train", "--output", str(student)) == 2
    assert "already exists" in capsys.readouterr().err and not out.exists()

"""The prompting baseline: its prompts, its noise margin and its verdict worked by hand, then
measured in a real run and by `lft eval --baseline`."""

import json

import pytest

from lft.cli.main import main
from lft.guards import baseline
from lft.objective import RowTexts


def test_prompts_put_the_system_prompt_then_the_examples_before_the_question():
    rows = [{"prompt": "2 + 2?"}, {"prompt": [{"role": "system", "content": "own"}, {"role": "user", "content": "q"}]}]
    shots = [("1 + 1?", "1 + 1 = 2. The answer is 2.")]
    plain, own = baseline.prompts_with(rows, system="Be brief.", shots=shots)
    assert plain == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "1 + 1?"},
        {"role": "assistant", "content": "1 + 1 = 2. The answer is 2."},
        {"role": "user", "content": "2 + 2?"},
    ]
    assert [m["content"] for m in own] == ["own", "1 + 1?", "1 + 1 = 2. The answer is 2.", "q"]  # the row's own first


def test_examples_and_system_prompt_come_from_the_training_rows():
    rows = [
        {"messages": [{"role": "system", "content": "You add."}, {"role": "user", "content": "q1"}]},
        {"prompt": "q2", "completion": "a2"},
        {"prompt": "q3", "completion": "a3"},
    ]

    def texts(row):
        return RowTexts(prompts=[row["prompt"]], answers=[row["completion"]]) if "prompt" in row else RowTexts()

    assert baseline.system_prompt_of(rows) == "You add."
    assert sorted(baseline.shot_examples(rows, texts, 2, seed=0)) == [("q2", "a2"), ("q3", "a3")]
    task_shots = baseline.shot_examples(rows, texts, 3, seed=0)  # too few answers: the task's own examples
    assert len(task_shots) == 3 and all("The answer is" in answer for _, answer in task_shots)


def test_noise_and_verdict_by_hand():
    """0.58 and 0.60 on 100 prompts: 2 * sqrt((0.58 * 0.42 + 0.6 * 0.4) / 100) = 2 * sqrt(0.004836) = 0.139083."""
    assert baseline.noise(0.58, 0.60, 100) == pytest.approx(0.139083, abs=1e-6)
    summary = {
        "after": {"task_accuracy": 0.60},
        "baselines": {"system_prompt": {"task_accuracy": 0.40}, "shots": {"task_accuracy": 0.58, "shots": 3}},
        "baseline_rows": 100,
    }
    finding = baseline.verdict(summary)
    assert finding.status == "warning"
    assert finding.problems[0].startswith(
        "the base model with 3 examples in the prompt scores 0.58; the fine-tune 0.60: consider not fine-tuning"
    )
    summary["after"]["task_accuracy"] = 0.80  # 0.22 above the best baseline, past its noise of 0.13
    assert baseline.verdict(summary).status == "ok"
    assert baseline.verdict({"after": {"task_accuracy": 0.5}}).status == "skipped"


def test_a_run_measures_both_baselines_and_judges_the_fine_tune(lft_run):
    summary = lft_run("eval.task=arith", "eval.task_samples=8", "eval.before=true", "trainer.max_steps=2")
    assert set(summary["baselines"]) == {"system_prompt", "shots"}
    assert summary["baselines"]["shots"]["shots"] == 3 and summary["baseline_rows"] == 8
    assert all(0.0 <= b["task_accuracy"] <= 1.0 for b in summary["baselines"].values())
    guard = next(g for g in summary["guards"] if g["guard"] == "baseline")
    # a tiny random model scores 0 with every prompt, and so does its fine-tune: not beaten by more than noise
    assert guard["status"] == "warning" and "consider not fine-tuning" in guard["problems"][0]
    report = (summary["output"] / "report.md").read_text()
    assert "task accuracy, base with 3 examples in the prompt" in report and "prompting baseline" in report
    off = lft_run(
        "eval.task=arith", "eval.task_samples=8", "eval.before=true", "trainer.max_steps=2", "eval.baseline=0"
    )
    assert "baselines" not in off and not any(g["guard"] == "baseline" for g in off["guards"])


def test_lft_eval_baseline_without_training(tmp_path, capsys, lft_tiny_model):
    out = tmp_path / "eval.json"
    args = ["eval", "--model", str(lft_tiny_model), "--task", "arith", "--max-rows", "4", "--baseline"]
    assert main([*args, "--shots", "2", "--json", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert list(results)[:3] == ["base + system prompt", "base + 2 examples", "base"]
    assert all("task_accuracy" in r for r in results.values())
    assert "base + 2 examples" in capsys.readouterr().out
    assert main([*args, "--shots", "0"]) == 2
    assert "--shots must be at least 1" in capsys.readouterr().err

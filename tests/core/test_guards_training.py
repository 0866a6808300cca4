"""The guards that watch training: overfitting (and early stopping), repetition, forgetting, rank."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import lft
from lft.guards import measure
from lft.guards.monitor import GuardMonitor
from lft.plugin.testing import write_jsonl
from lft.plugins.sft import SFTObjective
from lft.train.module import LftModule

OVERFIT = [
    "--plugin",
    "full",
    "trainer.lr=1e-2",
    "trainer.batch_size=4",
    "trainer.eval_every=5",
    "trainer.schedule=constant",
    "trainer.warmup_ratio=0",
    "guards.repetition.enabled=false",
    "guards.forgetting.enabled=false",
]


def guard(summary, name):
    return next(g for g in summary["guards"] if g["guard"] == name)


@pytest.fixture
def eight_rows(tmp_path, lft_sft_data):
    lines = lft_sft_data["train"].read_text().splitlines()[:8]
    return write_jsonl(tmp_path / "eight.jsonl", [__import__("json").loads(x) for x in lines])


def test_overfitting_a_tiny_set_fires_the_warning(lft_run, eight_rows, lft_sft_data):
    summary = lft_run(*OVERFIT, "trainer.max_steps=30", data=eight_rows, eval_data=lft_sft_data["eval"])
    finding = guard(summary, "overfit")
    assert finding["status"] == "warning", finding
    assert "the model is memorising its training rows" in finding["problems"][0]
    assert any(w.startswith("overfitting: eval loss rose from") for w in summary["warnings"])
    points = finding["data"]["points"]
    assert [p["step"] for p in points] == [5, 10, 15, 20, 25, 30]
    assert points[-1]["eval_loss"] > min(p["eval_loss"] for p in points)


def test_early_stopping_stops_and_restores_the_best_weights(lft_run, eight_rows, lft_sft_data):
    summary = lft_run(
        *OVERFIT,
        "trainer.max_steps=60",
        "guards.overfit.early_stopping=true",
        "guards.overfit.patience=2",
        "guards.overfit.restore_best=true",
        data=eight_rows,
        eval_data=lft_sft_data["eval"],
    )
    finding = guard(summary, "overfit")
    best = min(finding["data"]["points"], key=lambda p: p["eval_loss"])
    assert summary["steps"] == finding["data"]["points"][-1]["step"] < 60
    assert any(p.startswith(f"stopped early at step {summary['steps']}") for p in finding["problems"])
    assert any(p == f"restored the weights of step {best['step']} (best eval loss)" for p in finding["problems"])
    # the saved model is the best (the guard measures the objective's loss over the whole held-out set)
    assert summary["after"]["eval_loss"] == pytest.approx(best["eval_loss"], rel=1e-4)


def test_a_clean_run_is_quiet_and_writes_the_report(lft_run):
    summary = lft_run("trainer.max_steps=16", "trainer.lr=1e-3", "lora.r=8")
    statuses = {g["guard"]: g["status"] for g in summary["guards"]}
    assert statuses == {
        "template": "ok",
        "lint": "ok",
        "contamination": "ok",
        "overfit": "ok",
        "repetition": "ok",
        "forgetting": "ok",
        "rank": "ok",
    }, summary["guards"]
    assert summary["warnings"] == []
    assert len(guard(summary, "overfit")["data"]["points"]) == 5  # eval_every chosen by the guard: 16 // 5 = 3
    out = summary["output"]
    html = (out / "report.html").read_text()
    assert "<svg" in html and "No guard fired (7 checked)." in html and "KL(base||tuned)" in html
    markdown = (out / "report.md").read_text()
    assert "![loss](report/loss.svg)" in markdown and (out / "report" / "loss.svg").read_text().startswith("<svg")
    assert not list(out.glob(".*.tmp")) and (out / "guards" / "base.json").is_file()


# -- forgetting ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(lft_tiny_model):
    return AutoModelForCausalLM.from_pretrained(lft_tiny_model), AutoTokenizer.from_pretrained(lft_tiny_model)


def module_for(model, tokenizer, config):
    return LftModule(model, tokenizer, objective=SFTObjective(), hook=None, config=config)


def drift(model, scale):
    moved = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * scale)
    return moved


@pytest.mark.parametrize("scale, fires", [(0.0, False), (1e-4, False), (0.1, True)])
def test_forgetting_fires_on_a_drifted_model_only(tiny, scale, fires):
    model, tokenizer = tiny
    config = lft.load_config(overrides=["guards.forgetting.samples=8", "guards.forgetting.max_new_tokens=16"])
    monitor = GuardMonitor(config)
    monitor.base = {"forgetting": monitor._retain(module_for(model, tokenizer, config), None, seed=0)}
    tuned = module_for(drift(model, scale), tokenizer, config)
    monitor.after = {"forgetting": monitor._retain(tuned, monitor.base["forgetting"], seed=0)}
    finding = monitor._forgetting()
    assert finding.fired == fires, finding
    kl = finding.data["kl_per_token"]
    if scale == 0:
        assert kl == 0 and finding.data["perplexity_after"] == finding.data["perplexity_before"]
    if fires:
        assert kl > config.guards.forgetting.max_kl and any("drifted from the base" in p for p in finding.problems)


def test_kl_per_token_by_hand():
    """Two completions of 2 and 3 tokens; base log-prob sums -2 and -3, tuned -2.5 and -3.5:
    ((-2 + 2.5) + (-3 + 3.5)) / 5 = 0.2."""
    assert measure.kl_per_token([(-2.0, 2), (-3.0, 3)], [(-2.5, 2), (-3.5, 3)]) == pytest.approx(0.2)


# -- repetition ------------------------------------------------------------------------------------


def test_repetition_rate_by_hand():
    assert measure.repetition_rate([1, 2, 3, 1, 2, 3]) == pytest.approx(0.25)  # trigrams 123 231 312 123
    assert measure.repetition_rate([5, 5, 5, 5, 5]) == pytest.approx(2 / 3)  # three 555 trigrams, one distinct
    assert measure.repetition_rate([1, 2, 3, 4]) == 0.0 and measure.repetition_rate([1]) == 0.0
    stats = measure.generation_stats([([1, 2, 3, 1, 2, 3], True), ([7, 8], False)])
    assert stats == {"repetition": 0.125, "no_stop": 0.5, "length": 4.0, "samples": 2}


def test_repetition_guard_compares_with_the_base():
    monitor = GuardMonitor(lft.load_config())
    monitor.base = {"repetition": {"repetition": 0.05, "no_stop": 0.0, "length": 12, "samples": 16}}
    monitor.after = {"repetition": {"repetition": 0.08, "no_stop": 0.0, "length": 11, "samples": 16}}
    assert monitor._repetition().status == "ok"
    monitor.after = {"repetition": {"repetition": 0.40, "no_stop": 0.5, "length": 64, "samples": 16}}
    finding = monitor._repetition()
    assert finding.status == "warning" and len(finding.problems) == 2
    assert "never reach an end-of-turn token" in finding.problems[1]


def test_sampling_leaves_the_training_random_stream_alone(tiny):
    model, tokenizer = tiny
    torch.manual_seed(3)
    expected = torch.rand(3)
    torch.manual_seed(3)
    first = measure.sample(model, tokenizer, [[1, 5, 9], [1, 7]], max_new_tokens=5, temperature=1.0, seed=0)
    assert torch.equal(torch.rand(3), expected)
    assert measure.sample(model, tokenizer, [[1, 5, 9], [1, 7]], max_new_tokens=5, temperature=1.0, seed=0) == first


# -- rank ------------------------------------------------------------------------------------------


def rank_finding(rank, losses, wrapper="lora"):
    monitor = GuardMonitor(lft.load_config())
    monitor.rank = rank
    monitor.points = [{"step": 10 * (i + 1), "eval_loss": e, "train_loss": t} for i, (e, t) in enumerate(losses)]
    return monitor._rank({"wrapper": wrapper})


def test_rank_advice_on_a_plateau_well_above_train_loss():
    plateau = [(1.5, 1.4), (1.21, 1.0), (1.203, 0.8), (1.201, 0.7), (1.200, 0.6)]
    finding = rank_finding(8, plateau)
    assert finding.status == "warning" and finding.problems[0].endswith("try lora.r=16")
    assert rank_finding(64, plateau).status == "ok"  # a high rank already
    improving = [(1.5, 1.4), (1.3, 1.0), (1.1, 0.8), (0.9, 0.7), (0.7, 0.6)]
    assert rank_finding(8, improving).status == "ok"
    close = [(1.5, 1.4), (1.21, 1.2), (1.203, 1.19), (1.201, 1.18), (1.200, 1.18)]
    assert rank_finding(8, close).status == "ok"  # eval not well above train
    assert rank_finding(None, plateau).status == "skipped"

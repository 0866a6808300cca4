"""End to end: reward, dpo, orpo, simpo and cpo through `lft run` on the tiny model."""

import json

import pytest
import torch
from test_run import Grab, assert_loss_goes_down, fast_config, history

import lft
from lft.losses import DPOLoss
from lft.plugins.dpo import DPO


@pytest.fixture(scope="module")
def learnable(tmp_path_factory, lft_pref_data):
    """The tiny preference set with a rule the tiny random model can learn and generalise: the
    rejected answer ends in '!' instead of '.'. Before training the model prefers each side about
    equally often."""
    out = {}
    folder = tmp_path_factory.mktemp("learnable")
    for split in ("train", "eval"):
        rows = [json.loads(line) for line in lft_pref_data[split].read_text().splitlines()]
        rows = [{**r, "rejected": r["chosen"][:-1] + "!"} for r in rows]
        out[split] = folder / f"{split}.jsonl"
        out[split].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


STEP_METRICS = {"rewards_chosen", "rewards_rejected", "margin", "accuracy"}


@pytest.mark.parametrize(
    "plugin, accuracy",
    [
        ("dpo", "eval_preference_accuracy"),
        ("orpo", "eval_preference_accuracy"),
        ("simpo", "eval_preference_accuracy"),
        ("cpo", "eval_preference_accuracy"),
        ("reward", "eval_accuracy"),
    ],
)
def test_each_objective_learns_a_learnable_preference(lft_run, learnable, plugin, accuracy):
    summary = lft_run(
        "--plugin",
        plugin,
        "trainer.max_steps=20",
        "trainer.lr=1e-2",
        "eval.before=true",
        data=learnable["train"],
        eval_data=learnable["eval"],
    )
    assert summary["objective"] == plugin and summary["wrapper"] == "lora"
    assert_loss_goes_down(summary["output"], 20)
    before, after = summary["before"][accuracy], summary["after"][accuracy]
    assert before <= 0.75 and after >= 0.9 and after > before, (before, after)
    assert summary["after"]["eval_loss"] < summary["before"]["eval_loss"]
    steps = history(summary["output"])
    assert STEP_METRICS <= set(steps[-1])
    assert steps[-1]["accuracy"] > steps[0]["accuracy"] or steps[0]["accuracy"] == 1.0
    if plugin == "dpo":  # reference-based: reference log-probs logged, policy started equal to it
        assert {"ref_logps_chosen", "ref_logps_rejected", "logps_chosen", "logps_rejected"} <= set(steps[-1])
        assert summary["notes"]["reference_start_gap"] < 1e-4
    elif plugin != "reward":
        assert "ref_logps_chosen" not in steps[-1] and "notes" not in summary


@pytest.mark.parametrize("variant", ["ipo", "hinge", "robust"])
def test_dpo_variants_train(lft_run, learnable, variant):
    extra = ["dpo.label_smoothing=0.1"] if variant == "robust" else []
    summary = lft_run(
        "--plugin",
        "dpo",
        f"dpo.loss={variant}",
        "trainer.max_steps=20",
        "trainer.lr=1e-2",
        *extra,
        data=learnable["train"],
        eval_data=learnable["eval"],
    )
    assert_loss_goes_down(summary["output"], 20)
    assert summary["after"]["eval_margin"] > 0


def test_full_fine_tuning_dpo_keeps_its_frozen_reference_fixed(lft_run, lft_pref_data):
    summary = lft_run(
        "--plugin",
        "dpo",
        "--plugin",
        "full",
        "trainer.max_steps=8",
        "trainer.lr=1e-3",
        "eval.before=true",
        data=lft_pref_data["train"],
        eval_data=lft_pref_data["eval"],
    )
    assert summary["wrapper"] == "full" and (summary["output"] / "final" / "model.safetensors").is_file()
    before, after = summary["before"], summary["after"]
    assert after["eval_ref_logps_chosen"] == pytest.approx(before["eval_ref_logps_chosen"], abs=1e-4)
    assert after["eval_logps_chosen"] != pytest.approx(before["eval_logps_chosen"], abs=1e-2)


def test_reward_model_is_saved_as_a_sequence_classifier_that_scores_like_training(tmp_path, lft_tiny_model, learnable):
    from transformers import AutoModelForSequenceClassification

    from lft.adapters import scorer, value_head
    from lft.plugins.pairs import concatenated, format_pair
    from lft.plugins.reward import RewardOptions

    grab = Grab()
    config = fast_config(
        lft_tiny_model, learnable, tmp_path / "out", plugins=["reward"], **{"trainer.max_steps": 15, "trainer.lr": 1e-2}
    )
    result = lft.run(config, plugins=[grab], quiet=True)
    final = result.final
    assert (final / "model.safetensors").is_file() and (final / "tokenizer.json").is_file()
    assert AutoModelForSequenceClassification.from_pretrained(final).config.num_labels == 1

    scorer = scorer.load(final)
    rows = [json.loads(line) for line in learnable["eval"].read_text().splitlines()]
    chosen = scorer.score([r["prompt"] for r in rows], [r["chosen"] for r in rows], batch_size=5)
    rejected = scorer.score([r["prompt"] for r in rows], [r["rejected"] for r in rows])
    assert sum(c > r for c, r in zip(chosen, rejected)) / len(rows) == pytest.approx(
        result.metrics["after"]["eval_accuracy"]
    )

    # the exported classifier gives the value head's rewards
    tokenizer = scorer.tokenizer
    feature = format_pair(rows[0], tokenizer, RewardOptions(), 1024, "reward")
    batch = {k: torch.tensor([v]) for k, v in feature.items() if k.endswith(("input_ids", "labels"))}
    batch.update(
        {
            k.replace("input_ids", "attention_mask"): torch.ones_like(v)
            for k, v in batch.items()
            if k.endswith("input_ids")
        }
    )
    ids, mask, _ = concatenated(batch, tokenizer.pad_token_id)
    grab.model.eval()
    with torch.no_grad():
        trained = value_head.rewards(grab.model, ids, mask, tokenizer.pad_token_id)
    assert trained.tolist() == pytest.approx([chosen[0], rejected[0]], abs=1e-4)


def test_reward_margin_column_is_read(tmp_path, lft_run, learnable):
    rows = [dict(json.loads(line), margin=0.5) for line in learnable["train"].read_text().splitlines()]
    data = tmp_path / "margins.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = lft_run("--plugin", "reward", "trainer.max_steps=2", data=data, eval_data=False)
    assert summary["steps"] == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(dict(rows[0], margin="big")) + "\n")
    with pytest.raises(AssertionError, match="exited with 2"):
        lft_run("--plugin", "reward", "trainer.max_steps=1", data=bad, eval_data=False)


class Halved(DPO):
    """A third party's DPO with its own loss: half the sigmoid loss, and a warning."""

    def objective(self, config):
        objective = super().objective(config)
        objective.warnings.append("halved on purpose")
        return objective

    def loss(self, options):
        base = DPOLoss(beta=options.beta)

        class Half:
            needs_reference = True

            def __call__(self, logps):
                out = base(logps)
                out.loss = out.loss / 2
                return out

        return Half()


def test_a_subclass_replaces_the_loss_and_its_warnings_reach_the_summary(tmp_path, lft_tiny_model, lft_pref_data):
    config = fast_config(lft_tiny_model, lft_pref_data, tmp_path / "out", **{"trainer.max_steps": 1})
    result = lft.run(config, plugins=[Halved()], quiet=True)
    assert result.metrics["objective"] == "dpo"
    assert result.history[0]["loss"] == pytest.approx(0.6931472 / 2, abs=1e-5)  # policy == reference at step 1
    assert result.metrics["warnings"] == ["halved on purpose"]


def test_default_data_and_settings_are_valid(lft_pref_data):
    from lft.data import task
    from lft.plugin.manager import PluginManager
    from lft.train.engine import resolve

    manager = PluginManager()
    forms = {
        "sft": "sft",
        "dpo": "pref",
        "orpo": "pref",
        "simpo": "pref",
        "reward": "pref",
        "grpo": "prompts",
        "ppo": "prompts",
    }
    for name, form in forms.items():
        default = manager.infos[name].obj.lft_default_data()
        assert default["train"] == str(task.path(form, "train")) and default["eval"] == str(task.path(form, "eval"))
        # merged before the one validation: every key exists and validates; the user's own value is kept
        resolved = resolve({"plugins": [name], "trainer": {"batch_size": 2}}, manager)
        assert resolved.default_data and resolved.config.data.train == default["train"]
        assert resolved.config.trainer.batch_size == 2
        assert not any(item.startswith("trainer.batch_size=") for item in resolved.applied)
        assert "batch_size" in resolved.config.trainer.model_fields_set
        if "trainer.max_steps" in default["settings"]:
            assert resolved.config.trainer.max_steps == default["settings"]["trainer.max_steps"]
            assert f"trainer.max_steps={default['settings']['trainer.max_steps']}" in resolved.applied
    sft = resolve({}, manager).config
    # the default job keeps its everyday answers with a tenth of the base's own answers mixed in
    assert sft.guards.forgetting.mix_ratio == 0.1 and sft.guards.forgetting.mix_data == "self"
    grpo = manager.infos["grpo"].obj.lft_default_data()["settings"]
    # Measured on the embedded task: at T=1 the instruct model's samples are right about 3% of the time.
    assert grpo["grpo.temperature"] < 1 and grpo["grpo.num_generations"] >= 8

"""PPO and GRPO end to end on the tiny model: the policy learns to emit the token a reward plugin
counts, through `lft run` (a reward found by its entry point) and `lft.run(plugins=[...])`; and
bad input stops the run with one line."""

import importlib
import json
import sys
import textwrap

import pytest

import lft
import lft.train.checkpoint
from lft.cli.main import main
from lft.plugin.testing import FAST, install_fake_distribution, likeliest_first_token

COUNT_TOKEN = textwrap.dedent('''
    import lft

    TARGET = {target}


    class CountToken:
        """Reward: how many times the completion holds token TARGET."""

        name = "count_token"
        kind = "extension"

        @lft.hookimpl
        def lft_reward(self, prompts, completions, batch, config):
            hits = (batch["completion_ids"] == TARGET) & batch["completion_mask"]
            return {{"name": self.name, "scores": hits.sum(-1).float().tolist(), "weight": 1.0}}
''')


@pytest.fixture(scope="module")
def target(lft_tiny_model, lft_prompt_data):
    """The token the untrained tiny model finds most likely to start an answer (about 2%)."""
    return likeliest_first_token(lft_tiny_model, lft_prompt_data["train"])


@pytest.fixture
def count_token(tmp_path, monkeypatch, target):
    """The reward plugin above, installed as a third-party package with an entry point."""
    monkeypatch.delenv("LFT_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    monkeypatch.delenv("LFT_PLUGINS", raising=False)
    root = install_fake_distribution(
        tmp_path / "site",
        "lft-count-token",
        {"count_token": "lft_count_token:CountToken"},
        {"lft_count_token": COUNT_TOKEN.format(target=target)},
    )
    monkeypatch.syspath_prepend(str(root))
    importlib.invalidate_caches()
    yield importlib.import_module("lft_count_token").CountToken
    sys.modules.pop("lft_count_token", None)


def steps(output):
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines() if '"reward"' in line]


def rises(history, by):
    rewards = [h["reward"] for h in history]
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert last > first + by, f"mean reward did not go up: {rewards}"


ONLINE_FAST = ["trainer.schedule=constant", "trainer.warmup_steps=0", "trainer.batch_size=4"]


def test_grpo_learns_to_emit_the_rewarded_token_through_the_cli(lft_run, lft_prompt_data, count_token):
    summary = lft_run(
        "--plugin",
        "grpo",
        "--plugin",
        "count_token",
        "trainer.max_steps=12",
        "trainer.lr=3e-2",
        "grpo.num_generations=4",
        "grpo.max_new_tokens=8",
        "eval.before=true",
        *ONLINE_FAST,
        data=lft_prompt_data["train"],
        eval_data=lft_prompt_data["eval"],
    )
    assert summary["objective"] == "grpo" and summary["extensions"] == ["count_token"]
    history = steps(summary["output"])
    assert len(history) == 12
    rises(history, by=1.0)
    for key in (
        "reward_std",
        "reward_count_token",
        "reward_count_token_std",
        "entropy",
        "clip_fraction",
        "completion_length",
        "completion_length_max",
        "reward_length_corr",
        "rollout_s",
        "update_s",
        "generation_tokens_per_s",
        "groups_without_signal",
    ):
        assert key in history[-1], key
    assert summary["after"]["eval_reward_count_token"] > summary["before"]["eval_reward_count_token"]
    samples = [json.loads(x) for x in (summary["output"] / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 24 and {"step", "prompt", "completion", "reward", "count_token"} <= set(samples[0])
    assert (summary["output"] / "final" / "adapter_config.json").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["bnpo", "cispo", "sapo"])
def test_the_newer_grpo_losses_learn_the_rewarded_token(lft_run, lft_prompt_data, count_token, variant):
    summary = lft_run(
        "--plugin", "grpo", "--plugin", "count_token", "trainer.max_steps=16", "trainer.lr=3e-2",
        "grpo.num_generations=4", "grpo.max_new_tokens=8", f"grpo.loss={variant}", "grpo.epsilon_high=0.28",
        *ONLINE_FAST, data=lft_prompt_data["train"], eval_data=lft_prompt_data["eval"],
    )  # fmt: skip
    rises(steps(summary["output"]), by=0.8)


@pytest.mark.parametrize("reduce", ["token", "sequence"])
def test_rloo_learns_the_rewarded_token_with_its_kl_in_the_reward(lft_run, lft_prompt_data, count_token, reduce):
    summary = lft_run(
        "--plugin", "rloo", "--plugin", "count_token", "trainer.max_steps=12", "trainer.lr=3e-2",
        "rloo.num_generations=4", "rloo.max_new_tokens=8", f"rloo.reduce={reduce}", "eval.before=true",
        *ONLINE_FAST, data=lft_prompt_data["train"], eval_data=lft_prompt_data["eval"],
    )  # fmt: skip
    assert summary["objective"] == "rloo"
    history = steps(summary["output"])
    rises(history, by=1.0)
    assert {"kl", "reward_kl_penalty", "groups_without_signal", "clip_fraction"} <= set(history[-1])
    assert history[0]["kl"] == pytest.approx(0.0, abs=1e-3) and history[-1]["kl"] > 0  # the reference is the start
    assert summary["after"]["eval_reward_count_token"] > summary["before"]["eval_reward_count_token"]


def test_online_dpo_learns_the_rewarded_token_from_its_own_ranked_pairs(lft_run, lft_prompt_data, count_token):
    summary = lft_run(
        "--plugin", "online_dpo", "--plugin", "count_token", "trainer.max_steps=12", "trainer.lr=3e-2",
        "online_dpo.num_generations=4", "online_dpo.max_new_tokens=8", "online_dpo.minibatches=2",
        "trainer.grad_accum=2", "eval.before=true", *ONLINE_FAST, data=lft_prompt_data["train"],
        eval_data=lft_prompt_data["eval"],
    )  # fmt: skip
    assert summary["objective"] == "online_dpo"
    history = steps(summary["output"])
    rises(history, by=1.0)
    assert {"margin", "accuracy", "ranked_pairs", "score_gap", "kl"} <= set(history[-1])
    assert sum(h["margin"] for h in history[-3:]) > 0  # chosen samples gained log-ratio over rejected ones
    assert all(h["score_gap"] > 0 for h in history if "score_gap" in h)  # chosen always out-scored rejected
    assert history[0]["kl"] < 0.5  # over the scored pairs only, which start at the reference
    assert summary["after"]["eval_reward_count_token"] > summary["before"]["eval_reward_count_token"]


def ppo_config(model, data, output, **extra):
    config = {
        "model.path": str(model),
        "data.train": str(data["train"]),
        "data.eval": str(data["eval"]),
        "output": str(output),
        "plugins": ["ppo", "full"],
        "trainer.precision": "32-true",
        "trainer.checkpoint_every": 0,
        "trainer.eval_every": 0,
        "eval.task": "none",
        "eval.before": False,
        "data.max_eval_rows": 8,
        "trainer.lr": 1e-2,
        "trainer.batch_size": 16,
        "trainer.schedule": "constant",
        "trainer.warmup_steps": 0,
        "ppo.max_new_tokens": 8,
        "ppo.beta": 0.01,
        "ppo.kl_warning": 5.0,
    }
    return {**config, **extra}


def test_ppo_learns_to_emit_the_rewarded_token_from_python(tmp_path, lft_tiny_model, lft_prompt_data, count_token):
    result = lft.run(
        ppo_config(lft_tiny_model, lft_prompt_data, tmp_path / "ppo", **{"trainer.max_steps": 32}),
        plugins=[count_token()],
        quiet=True,
    )
    history = result.history
    assert [h["step"] for h in history] == [4, 8, 12, 16, 20, 24, 28, 32]  # 2 epochs x 2 minibatches per rollout
    rises(history, by=0.8)
    for key in ("value_loss", "explained_variance", "kl", "kl_coef", "approx_kl", "clip_fraction", "value_mean"):
        assert key in history[-1], key
    assert any("KL to the reference" in w and "ppo.kl_warning=5" in w for w in result.metrics.get("warnings", []))
    assert (result.final / "model.safetensors").is_file()


def test_ppo_checkpoints_hold_the_value_head_and_resume(tmp_path, lft_tiny_model, lft_prompt_data, count_token):
    output = tmp_path / "ppo"
    lft.run(
        ppo_config(lft_tiny_model, lft_prompt_data, output, **{"trainer.max_steps": 8, "ppo.kl_target": 1.0}),
        plugins=[count_token()],
        quiet=True,
    )
    checkpoint = lft.train.checkpoint.load(output / "checkpoints" / "last.ckpt")
    assert {"value_head.linear.weight", "value_head.linear.bias"} <= set(checkpoint["state_dict"])
    assert checkpoint["lft_objective"]["kl_control"]["beta"] != 0.01  # adapted, and saved
    resumed = lft.run(
        ppo_config(
            lft_tiny_model, lft_prompt_data, output, resume=True, **{"trainer.max_steps": 12, "ppo.kl_target": 1.0}
        ),
        plugins=[count_token()],
        quiet=True,
    )
    assert [h["step"] for h in resumed.history] == [12]


def run_cli(tmp_path, capsys, model, data, *args):
    argv = (
        ["run", "-q", "--model", str(model), "--data", str(data), "--output", str(tmp_path / "o")] + FAST + list(args)
    )
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_prompt_only_data_given_to_sft_says_which_methods_take_it(tmp_path, capsys, lft_tiny_model, lft_prompt_data):
    err = run_cli(tmp_path, capsys, lft_tiny_model, lft_prompt_data["train"])
    assert "found prompt, answer (rows with a prompt and no completion are for online methods" in err


def test_online_method_without_a_reward_function(tmp_path, capsys, lft_tiny_model, lft_prompt_data):
    err = run_cli(tmp_path, capsys, lft_tiny_model, lft_prompt_data["train"], "--plugin", "grpo")
    assert "no reward function is selected: add one, e.g. --plugin exact_answer" in err


def test_a_reward_model_that_does_not_exist(tmp_path, capsys, lft_tiny_model, lft_prompt_data):
    err = run_cli(
        tmp_path,
        capsys,
        lft_tiny_model,
        lft_prompt_data["train"],
        "--plugin",
        "ppo",
        "--plugin",
        "reward_model",
        "reward_model.path=/no/such/rm",
    )
    assert "reward_model.path: no reward model at /no/such/rm" in err


class Flaky:
    """Scores 0 for two batches, then raises on one sample of the third."""

    name, kind = "flaky", "extension"

    def __init__(self):
        self.calls, self.bad = 0, None

    @lft.hookimpl
    def lft_reward(self, prompts, completions, batch, config):
        self.calls += 1
        if self.calls == 3:
            self.bad = completions[1]
        if self.bad is not None and self.bad in completions:
            raise KeyError("no answer here")
        return {"name": self.name, "scores": [0.0] * len(completions), "weight": 1.0}


class NaNReward:
    name, kind = "nan_reward", "extension"

    @lft.hookimpl
    def lft_reward(self, prompts, completions, batch, config):
        return {"name": self.name, "scores": [float("nan")] + [1.0] * (len(completions) - 1), "weight": 1.0}


def grpo_config(model, data, output, **extra):
    return {
        **ppo_config(model, data, output),
        "plugins": ["grpo"],
        "trainer.batch_size": 2,
        "grpo.max_new_tokens": 4,
        "grpo.num_generations": 2,
        "eval.before": False,
        **extra,
    }


def test_a_reward_function_that_raises_is_named_and_the_progress_kept(tmp_path, lft_tiny_model, lft_prompt_data):
    output = tmp_path / "flaky"
    with pytest.raises(lft.LftError) as info:
        lft.run(
            grpo_config(lft_tiny_model, lft_prompt_data, output, **{"trainer.max_steps": 5}),
            plugins=[Flaky()],
            quiet=True,
        )
    message = str(info.value)
    assert "reward function 'flaky' raised KeyError: 'no answer here' on sample 1 (prompt '" in message
    assert "a checkpoint at step 2 was saved in" in message and "--resume" in message and "\n" not in message
    assert (output / "checkpoints" / "last.ckpt").is_file()


def test_a_nan_reward_is_one_line(tmp_path, lft_tiny_model, lft_prompt_data):
    with pytest.raises(lft.LftError, match=r"^reward function 'nan_reward' returned nan for sample 0 \(prompt '"):
        lft.run(
            grpo_config(lft_tiny_model, lft_prompt_data, tmp_path / "nan", **{"trainer.max_steps": 2}),
            plugins=[NaNReward()],
            quiet=True,
        )


class Characters:
    """Reward: the completion's length in characters (differs between samples, so it always teaches)."""

    name, kind = "characters", "extension"

    @lft.hookimpl
    def lft_reward(self, prompts, completions, batch, config):
        return {"name": self.name, "scores": [len(c) / 10 for c in completions], "weight": 1.0}


def test_grpo_with_a_kl_term_uses_the_adapter_disabled_reference(tmp_path, lft_tiny_model, lft_prompt_data):
    """LoRA's B matrices start at zero, so at the first step the policy is its reference: KL 0."""
    config = {
        **grpo_config(lft_tiny_model, lft_prompt_data, tmp_path / "kl"),
        "plugins": ["grpo", "lora"],
        "grpo.beta": 0.1,
        "trainer.max_steps": 3,
        "trainer.lr": 3e-2,
    }
    history = lft.run(config, plugins=[Characters()], quiet=True).history
    assert history[0]["kl"] == 0.0 and history[0]["kl_token"] == 0.0
    assert history[-1]["kl"] > 0.0


def test_which_passes_the_rollout_runs():
    """GRPO with one update per batch skips the scoring pass (its update's forward pass gives the
    same log-probs); with several it needs the rollout policy's log-probs. PPO always needs them,
    for the KL penalty inside its rewards, and the reference only when beta > 0."""
    from lft.plugins.grpo import GRPOObjective, GRPOOptions
    from lft.plugins.ppo import PPOObjective, PPOOptions

    config = lft.load_config(overrides=["output=/tmp/unused"])
    assert not GRPOObjective(GRPOOptions(), config).rollout.policy_logps
    assert GRPOObjective(GRPOOptions(epochs=2), config).rollout.policy_logps
    assert not GRPOObjective(GRPOOptions(), config).rollout.reference
    assert GRPOObjective(GRPOOptions(beta=0.1), config).rollout.reference
    single = PPOObjective(PPOOptions(epochs=1, minibatches=1, critic="reward_model"), config)
    assert single.rollout.policy_logps and single.rollout.reference and not single.rollout.hidden
    assert not PPOObjective(PPOOptions(beta=0.0), config).rollout.reference


def test_online_runs_are_not_watched_for_overfitting(tmp_path, lft_tiny_model, lft_prompt_data, recwarn):
    """A policy-gradient loss is not a likelihood: the guards neither schedule evaluations (each one a
    rollout) nor judge overfitting from it. Checkpoints are saved without Lightning's advice on manual
    optimization (the state after the step is the one meant)."""
    config = grpo_config(
        lft_tiny_model, lft_prompt_data, tmp_path / "g", **{"trainer.max_steps": 2, "trainer.checkpoint_every": 1}
    )
    config.pop("trainer.eval_every")
    result = lft.run(config, plugins=[Characters()], quiet=True)
    overfit = next(g for g in result.metrics["guards"] if g["guard"] == "overfit")
    assert overfit["status"] == "skipped" and "online objective" in overfit["detail"]
    records = [json.loads(line) for line in (tmp_path / "g" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and not [r for r in records if "eval_loss" in r]
    assert (tmp_path / "g" / "checkpoints" / "last.ckpt").is_file()
    assert not [w for w in recwarn if "ModelCheckpoint with manual optimization" in str(w.message)]

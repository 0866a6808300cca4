"""The built-in reward plugins, the reward-model critic, the reward-hacking warning, and the RLHF
chain on the tiny model: an SFT adapter becomes the PPO policy and its reference."""

import json

import pytest
import torch

import lft
import lft.train.checkpoint
from lft import config as cfgmod
from lft.output.summary import reward_task_warning
from lft.plugin.manager import PluginManager


def selection(*names, **settings):
    manager = PluginManager()
    config = cfgmod.build(dict(settings), cfgmod.config_class(cfgmod.plugin_sections(manager)))
    return manager.select(list(names)).hook, config


def test_exact_answer_reads_the_answer_column():
    hook, config = selection("exact_answer")
    completions = ["3 + 4 = 7. The answer is 7.", "The answer is 8.", "I think 12 - 5 is 7", "no idea"]
    (result,) = hook.lft_reward(
        prompts=["q"] * 4, completions=completions, batch={"answer": ["7", "7", "7", "7"]}, config=config
    )
    assert result == {"name": "exact_answer", "scores": [1.0, 0.0, 1.0, 0.0], "weight": 1.0}


@pytest.mark.parametrize(
    "completion, answer, score",
    [
        ("The answer is River.", "river", 1.0),  # a word, case-normalised
        ("It flows into the sea.\n  river ", "river", 1.0),  # the last line
        ("The answer is lake.", "river", 0.0),
        ("Answer:   Yes!", "yes", 1.0),
        ("The final answer is very positive.", "very positive", 1.0),  # a phrase, whitespace-normalised
        ("so the total is \\boxed{42}, not 41", "42", 1.0),
        ("\\boxed{\\text{north}}", "\\text{north}", 1.0),
        ("The answer is 1,000 apples.", "1000", 1.0),  # numbers compared as numbers
        ("The answer is 2.50", "2.5", 1.0),
        ("no answer here", "river", 0.0),
    ],
)
def test_exact_answer_compares_words_phrases_boxed_and_numbers(completion, answer, score):
    hook, config = selection("exact_answer")
    (result,) = hook.lft_reward(prompts=["q"], completions=[completion], batch={"answer": [answer]}, config=config)
    assert result["scores"] == [score]


def test_exact_answer_uses_math_verify_for_mathematical_answers():
    pytest.importorskip("math_verify")  # installed with the test extra
    hook, config = selection("exact_answer")
    completions = ["so x = \\boxed{\\frac{2}{4}}", "the answer is 0.5", "\\boxed{\\frac{1}{3}}"]
    (result,) = hook.lft_reward(
        prompts=["q"] * 3, completions=completions, batch={"answer": ["\\frac{1}{2}"] * 3}, config=config
    )
    assert result["scores"] == [1.0, 1.0, 0.0]
    off = selection("exact_answer", exact_answer={"math_verify": False})
    (result,) = off[0].lft_reward(
        prompts=["q"] * 3, completions=completions, batch={"answer": ["\\frac{1}{2}"] * 3}, config=off[1]
    )
    assert result["scores"] == [0.0, 0.0, 0.0]


def test_exact_answer_agrees_with_the_task_metric_on_the_embedded_task():
    """The reward and the held-out task accuracy score the embedded task's answers alike."""
    from lft.data import task
    from lft.plugins.rewards import answer_matches

    rows = [json.loads(line) for line in task.path("pref", "train").read_text().splitlines()]
    for row in rows:
        answer = task.extract_answer(row["chosen"])
        for text in (row["chosen"], row["rejected"], f"The answer is {answer} apples."):
            assert answer_matches(text, answer) == bool(task.score(text, answer)), text


def test_exact_answer_without_its_column_is_one_line():
    hook, config = selection("exact_answer", exact_answer={"column": "solution"})
    with pytest.raises(lft.DataError, match="exact_answer needs a 'solution' column in the data"):
        hook.lft_reward(prompts=["q"], completions=["7"], batch={"answer": ["7"]}, config=config)


def test_format_checks_a_regular_expression():
    hook, config = selection("format")
    completions = ["3 + 4 = 7. The answer is 7.", "The answer is 7.", "3 + 4 = 7. The answer is 7. Also 9."]
    (result,) = hook.lft_reward(prompts=["q"] * 3, completions=completions, batch={}, config=config)
    assert result["scores"] == [1.0, 0.0, 0.0] and result["weight"] == 0.5
    hook, config = selection("format", format={"pattern": r"^<think>.*</think>"})
    (result,) = hook.lft_reward(prompts=["q"] * 2, completions=["<think>a\nb</think> 7", "7"], batch={}, config=config)
    assert result["scores"] == [1.0, 0.0]
    with pytest.raises(lft.ConfigError, match=r"format.pattern: not a valid regular expression"):
        selection("format", format={"pattern": "(unclosed"})


@pytest.fixture(scope="module")
def tiny_reward_model(lft_tiny_model, tmp_path_factory):
    """A one-label sequence classifier on the tiny model's body: stands in for `lft run --plugin reward`."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    config = AutoConfig.from_pretrained(lft_tiny_model, num_labels=1)
    torch.manual_seed(1)
    model = AutoModelForSequenceClassification.from_config(config)
    folder = tmp_path_factory.mktemp("reward-model")
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(lft_tiny_model).save_pretrained(folder)
    return folder


def test_reward_model_scores_each_completion_like_the_classifier(tiny_reward_model):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from lft.data import chat

    hook, config = selection("reward_model", reward_model={"path": str(tiny_reward_model), "batch_size": 2})
    prompts, completions = ["Tom has 3 apples.", "How many?", "Mia"], ["3", "The answer is 12.", ""]
    (result,) = hook.lft_reward(prompts=prompts, completions=completions, batch={}, config=config)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_reward_model).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_reward_model)
    for prompt, completion, score in zip(prompts, completions, result["scores"]):
        ids = chat.tokenize_prompt_completion(tokenizer, prompt, completion, True)[0]
        with torch.no_grad():
            assert score == pytest.approx(float(model(torch.tensor([ids])).logits[0, 0]), abs=1e-5)


def test_critic_from_the_reward_model_reads_its_score_head_at_every_token(tiny_reward_model):
    from transformers import AutoModelForSequenceClassification

    from lft.adapters.critic import critic_from_classifier
    from lft.adapters.scorer import load_classifier

    classifier = AutoModelForSequenceClassification.from_pretrained(tiny_reward_model).eval()
    critic = critic_from_classifier(load_classifier(tiny_reward_model)).eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    values = critic(ids, torch.ones_like(ids))
    with torch.no_grad():
        assert values[0, -1].item() == pytest.approx(classifier(ids).logits[0, 0].item(), abs=1e-5)
    assert values.shape == (1, 4)
    assert all(p.requires_grad for p in critic.parameters())


def test_reward_hacking_warning():
    rising = [{"reward": r} for r in (0.1, 0.2, 0.5, 0.9)]
    summary = {"before": {"task_accuracy": 0.4}, "after": {"task_accuracy": 0.3}}
    assert "reward rose (0.1 -> 0.9) while the held-out task accuracy fell (0.4 -> 0.3)" in reward_task_warning(
        summary, rising, "reward"
    )
    assert (
        reward_task_warning({"before": {"task_accuracy": 0.4}, "after": {"task_accuracy": 0.5}}, rising, "reward")
        is None
    )
    assert reward_task_warning(summary, rising[::-1], "reward") is None
    assert reward_task_warning({}, rising, "reward") is None
    assert reward_task_warning(summary, rising, None) is None  # an objective without a training reward


def test_sft_adapter_becomes_the_ppo_policy_and_reference(
    tmp_path, lft_tiny_model, lft_sft_data, lft_prompt_data, tiny_reward_model
):
    """Stage 1 trains a LoRA adapter; stage 3 loads it merged into the base (same logits as base +
    adapter), trains a new adapter with a reward-model reward and critic, and starts at KL 0."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lft.model import loading

    common = {
        "trainer.precision": "32-true",
        "trainer.checkpoint_every": 0,
        "eval.task": "none",
        "eval.before": False,
        "data.max_eval_rows": 4,
        "model.path": str(lft_tiny_model),
    }
    sft = lft.run(
        {
            **common,
            "plugins": ["sft"],
            "data.train": str(lft_sft_data["train"]),
            "trainer.max_steps": 3,
            "trainer.lr": 1e-2,
            "output": str(tmp_path / "sft"),
        },
        quiet=True,
    )
    merged, _ = loading.load_model(cfgmod.build({"model": {"path": str(sft.final)}}, cfgmod.config_class()))
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(lft_tiny_model), sft.final)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        assert torch.allclose(merged.eval()(ids).logits, reference.eval()(ids).logits, atol=1e-5)

    ppo = lft.run(
        {
            **common,
            "plugins": ["ppo", "reward_model"],
            "model.path": str(sft.final),
            "data.train": str(lft_prompt_data["train"]),
            "data.eval": str(lft_prompt_data["eval"]),
            "reward_model.path": str(tiny_reward_model),
            "ppo.critic": "reward_model",
            "ppo.max_new_tokens": 6,
            "trainer.batch_size": 4,
            "trainer.max_steps": 8,
            "output": str(tmp_path / "ppo"),
        },
        quiet=True,
    )
    first, last = ppo.history[0], ppo.history[-1]
    assert first["kl"] == pytest.approx(0.0, abs=1e-6) and "reward_reward_model" in first
    assert last["kl"] > 0 and "explained_variance" in last
    checkpoint = lft.train.checkpoint.load(tmp_path / "ppo" / "checkpoints" / "last.ckpt")
    assert any(k.startswith("critic.head") for k in checkpoint["state_dict"])
    assert any("critic.body" in k and "lora_" in k for k in checkpoint["state_dict"])

    # The PPO adapter names the SFT adapter as its base; loading it merges the chain in order.
    assert json.loads((ppo.final / "adapter_config.json").read_text())["base_model_name_or_path"] == str(sft.final)
    chained, _ = loading.load_model(cfgmod.build({"model": {"path": str(ppo.final)}}, cfgmod.config_class()))
    by_hand = PeftModel.from_pretrained(merged, ppo.final).merge_and_unload()
    with torch.no_grad():
        assert torch.allclose(chained.eval()(ids).logits, by_hand.eval()(ids).logits, atol=1e-5)


def test_grpo_warns_when_no_group_has_a_learning_signal(lft_run, lft_prompt_data):
    """A reward no sample can earn (the tiny random model never states the answer) gives every
    sample of every prompt the same reward: the run says so once, and says what to check."""
    summary = lft_run(
        "--plugin",
        "grpo",
        "--plugin",
        "exact_answer",
        "trainer.max_steps=6",
        "trainer.batch_size=2",
        "trainer.eval_every=0",
        "grpo.num_generations=2",
        "grpo.max_new_tokens=4",
        "guards.enabled=false",
        data=lft_prompt_data["train"],
        eval_data=False,
    )
    warnings = [w for w in summary["warnings"] if w.startswith("no learning signal")]
    assert len(warnings) == 1 and "every sample of a prompt got the same reward, for 5 steps running" in warnings[0]

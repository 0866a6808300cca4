"""The vllm plugin's engine (``lft.plugins.vllm_rollout``) on the tiny model, with a real vLLM
engine in this process. Skipped where vLLM is not installed (``pip install -e ".[vllm]"``)."""

import pytest
import torch

vllm = pytest.importorskip("vllm")

import lft  # noqa: E402
from lft.adapters.lora import apply_lora  # noqa: E402
from lft.model.forward import token_logprobs  # noqa: E402
from lft.plugins.vllm_rollout import Engine, VLLMOptions  # noqa: E402
from lft.train.engine import resolve  # noqa: E402


@pytest.fixture(scope="module")
def vllm_tiny_model(tmp_path_factory):
    """The tiny model with 64-wide heads (vLLM's CPU attention needs 32 or more)."""
    from lft.plugin.testing import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("vllm-tiny"), hidden=256)


@pytest.fixture(scope="module")
def engine_and_policy(vllm_tiny_model):
    from transformers import AutoModelForCausalLM

    lft_tiny_model = vllm_tiny_model
    resolved = resolve(
        {"model": {"path": str(lft_tiny_model)}, "trainer": {"precision": "32-true"}, "data": {"max_length": 64}},
        lft.plugin.manager.PluginManager(),
    )
    engine = Engine(str(lft_tiny_model), resolved.config, VLLMOptions(memory_share=0.15), 16)
    policy = apply_lora(AutoModelForCausalLM.from_pretrained(lft_tiny_model), 4, 8, 0.0, "attention").eval()
    return engine, policy


def engine_logprobs(engine, ids):
    params = vllm.SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
    (out,) = engine.llm.generate([vllm.inputs.TokensPrompt(prompt_token_ids=ids)], params, use_tqdm=False)
    return torch.tensor([entry[token].logprob for entry, token in zip(out.prompt_logprobs[1:], ids[1:])])


def policy_logprobs(policy, ids):
    tensor = torch.tensor([ids])
    with torch.no_grad():
        logps, _ = token_logprobs(policy, tensor, torch.ones_like(tensor), tensor)
    return logps[0]


def test_after_each_update_the_engine_scores_a_completion_as_the_policy_does(engine_and_policy):
    engine, policy = engine_and_policy
    ids = [5, 17, 42, 8, 99, 3, 61, 27, 14, 70]
    for step in range(2):
        torch.manual_seed(step)
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.data.normal_(0, 0.5)  # an update: the adapters move
        before = engine_logprobs(engine, ids)
        engine.sync(policy, step)
        after = engine_logprobs(engine, ids)
        want = policy_logprobs(policy, ids)
        torch.testing.assert_close(after, want, atol=2e-3, rtol=1e-3)
        assert (before - want).abs().max() > 1e-2  # the sync changed what the engine samples from


def test_the_engine_samples_the_rollout_contract(engine_and_policy):
    from lft.online.rollout import RolloutSettings

    engine, _ = engine_and_policy
    settings = RolloutSettings(max_new_tokens=6, temperature=1.0, num_generations=3)
    prompts = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])
    out = engine.generate(None, prompts, (prompts != 0).long(), settings, [2], pad_id=0)
    assert out.shape[0] == 6 and out.shape[1] <= 6  # prompts x samples, at most max_new_tokens
    greedy = RolloutSettings(max_new_tokens=6, temperature=0.0, num_generations=2)
    first = engine.generate(None, prompts, (prompts != 0).long(), greedy, [2], pad_id=0)
    assert torch.equal(first[0], first[1])  # greedy samples of one prompt agree

"""The vllm plugin (``lft.plugins.vllm_rollout``, ``lft.plugins.vllm_server``) on the tiny model,
with real vLLM engines: one in this process, one behind ``lft vllm-serve`` on loopback, and the
one a run starts. Skipped where vLLM is not installed (``pip install -e ".[vllm]"``)."""

import json
import socket
import subprocess
import sys

import pytest
import torch

vllm = pytest.importorskip("vllm")

import lft  # noqa: E402
from lft.adapters.lora import apply_lora  # noqa: E402
from lft.online.rollout import RolloutSettings, stop_mask  # noqa: E402
from lft.plugins.vllm_rollout import Engine, VLLMOptions  # noqa: E402
from lft.plugins.vllm_server import RemoteSampler  # noqa: E402
from lft.train.engine import resolve  # noqa: E402

PROMPTS = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])
STOP = [2]


@pytest.fixture(scope="module")
def vllm_tiny_model(tmp_path_factory):
    """The tiny model with 64-wide heads (vLLM's CPU attention needs 32 or more)."""
    from lft.plugin.testing import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("vllm-tiny"), hidden=256)


def tiny_config(model):
    overrides = {"model": {"path": str(model)}, "trainer": {"precision": "32-true"}, "data": {"max_length": 64}}
    return resolve(overrides, lft.plugin.manager.PluginManager()).config


@pytest.fixture(scope="module")
def engine(vllm_tiny_model):
    engine = Engine.colocated(str(vllm_tiny_model), tiny_config(vllm_tiny_model), VLLMOptions(memory_share=0.05), 16)
    yield engine
    engine.sampler.close()


def load_policy(model, lora):
    from transformers import AutoModelForCausalLM

    policy = AutoModelForCausalLM.from_pretrained(model)
    return (apply_lora(policy, 4, 8, 0.0, "attention") if lora else policy).eval()


def engine_logprobs(engine, ids):
    params = vllm.SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
    (out,) = engine.llm.generate([vllm.inputs.TokensPrompt(prompt_token_ids=ids)], params, use_tqdm=False)
    return torch.tensor([entry[token].logprob for entry, token in zip(out.prompt_logprobs[1:], ids[1:])])


def policy_logprobs(policy, ids, temperature=1.0):
    tensor = torch.tensor([ids])
    with torch.no_grad():
        logits = policy(tensor).logits[0, :-1].float() / temperature
    return logits.log_softmax(-1).gather(-1, tensor[0, 1:, None])[:, 0]


def sampled_agree(engine, policy, temperature):
    """Sample with the engine; its log-prob of every sampled token equals the policy's."""
    settings = RolloutSettings(max_new_tokens=8, temperature=temperature, num_generations=3)
    completion, logps = engine.generate(None, PROMPTS, (PROMPTS != 0).long(), settings, STOP, pad_id=0)
    assert completion.shape[0] == 6 and completion.shape[1] <= 8 and logps.shape == completion.shape
    mask = stop_mask(completion, STOP)
    worst = 0.0
    for i, row in enumerate(completion):
        prompt = PROMPTS[i // 3][PROMPTS[i // 3] != 0].tolist()
        tokens = row[mask[i]].tolist()
        want = policy_logprobs(policy, prompt + tokens, temperature)[-len(tokens) :]
        torch.testing.assert_close(logps[i, : len(tokens)], want, atol=2e-3, rtol=1e-3)
        worst = max(worst, float((logps[i, : len(tokens)] - want).abs().max()))
    return worst


def perturb(policy, seed, lora):
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if not lora:
                param.add_(torch.randn_like(param) * 0.05)  # embeddings (tied to the head) included
            elif "lora_B" in name:
                param.normal_(0, 0.5)


@pytest.mark.parametrize("lora", [True, False], ids=["lora-folded", "full-weights"])
def test_after_each_update_the_engine_scores_and_samples_as_the_policy_does(engine, vllm_tiny_model, lora):
    policy = load_policy(vllm_tiny_model, lora)
    ids = [5, 17, 42, 8, 99, 3, 61, 27, 14, 70]
    for step in range(2):
        perturb(policy, step, lora)
        before = engine_logprobs(engine, ids)
        engine.sync(policy, (lora, step))
        after = engine_logprobs(engine, ids)
        want = policy_logprobs(policy, ids)
        torch.testing.assert_close(after, want, atol=2e-3, rtol=1e-3)
        assert (before - want).abs().max() > 1e-2  # the sync changed what the engine samples from
    sampled_agree(engine, policy, 1.0)
    sampled_agree(engine, policy, 0.7)  # the engine reports the tempered distribution it samples


def test_the_engine_samples_the_rollout_contract(engine):
    greedy = RolloutSettings(max_new_tokens=6, temperature=0.0, num_generations=2)
    first, _ = engine.generate(None, PROMPTS, (PROMPTS != 0).long(), greedy, STOP, pad_id=0)
    assert first.shape[0] == 4 and torch.equal(first[0], first[1])  # greedy samples of one prompt agree
    torch.manual_seed(0)
    settings = RolloutSettings(max_new_tokens=6, temperature=1.0, num_generations=4)
    a, _ = engine.generate(None, PROMPTS, (PROMPTS != 0).long(), settings, STOP, pad_id=0)
    torch.manual_seed(0)
    b, _ = engine.generate(None, PROMPTS, (PROMPTS != 0).long(), settings, STOP, pad_id=0)
    assert torch.equal(a, b)  # the run's seed fixes the samples
    assert len({tuple(r.tolist()) for r in a[:4]}) > 1  # the samples of one prompt differ


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(vllm_tiny_model):
    """``lft vllm-serve`` on loopback, in its own process."""
    port = free_port()
    command = [sys.executable, "-m", "lft.cli", "vllm-serve", "--model", str(vllm_tiny_model), "--port", str(port)]
    command += ["--dtype", "float32", "--memory-share", "0.05", "--max-model-len", "128"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        yield f"http://127.0.0.1:{port}", process
    finally:
        process.terminate()
        process.wait(timeout=60)


def test_server_mode_on_loopback_syncs_and_samples_as_the_policy(server, vllm_tiny_model):
    url, _ = server
    remote = Engine(RemoteSampler(url, timeout=240))
    assert remote.sampler.info["max_model_len"] == 128
    policy = load_policy(vllm_tiny_model, lora=True)
    perturb(policy, 3, lora=True)
    remote.sync(policy, 0)
    assert sampled_agree(remote, policy, 1.0) < 2e-3
    with pytest.raises(
        lft.PluginError,
        match="refused /weights: PluginError: 1 weight.s. the model at .* does not have, e.g. no_such.weight",
    ):
        remote.sampler.load([("no_such.weight", torch.zeros(2))])
    assert sampled_agree(remote, policy, 1.0) < 2e-3  # the server kept serving


class CountToken:
    """Reward: how many times the completion holds the target token."""

    name = "count_token"
    kind = "extension"

    def __init__(self, target):
        self.target = target

    @lft.hookimpl
    def lft_reward(self, prompts, completions, batch, config):
        hits = (batch["completion_ids"] == self.target) & batch["completion_mask"]
        return {"name": self.name, "scores": hits.sum(-1).float().tolist(), "weight": 1.0}


@pytest.fixture(scope="module")
def target(vllm_tiny_model, lft_prompt_data):
    """The token the untrained model finds most likely to start an answer, as in tests/e2e."""
    from lft.plugin.testing import likeliest_first_token

    return likeliest_first_token(vllm_tiny_model, lft_prompt_data["train"])


def online_config(model, data, output, method, **extra):
    return {
        "model.path": str(model),
        "data.train": str(data["train"]),
        "output": str(output),
        "plugins": [method, "vllm"],
        "trainer.precision": "32-true",
        "trainer.checkpoint_every": 0,
        "trainer.eval_every": 0,
        "eval.task": "none",
        "eval.before": False,
        "trainer.schedule": "constant",
        "trainer.warmup_steps": 0,
        "trainer.batch_size": 4,
        f"{method}.max_new_tokens": 8,
        "vllm.memory_share": 0.05,
        **extra,
    }


def rewards(result):
    return [h["reward"] for h in result.history]


def test_grpo_with_the_vllm_plugin_learns_the_rewarded_token(tmp_path, vllm_tiny_model, lft_prompt_data, target):
    config = online_config(
        vllm_tiny_model,
        lft_prompt_data,
        tmp_path / "grpo",
        "grpo",
        **{"trainer.max_steps": 12, "trainer.lr": 3e-2, "grpo.num_generations": 4},
    )
    result = lft.run(config, plugins=[CountToken(target)], quiet=True)
    history = rewards(result)
    assert sum(history[-3:]) / 3 > sum(history[:3]) / 3 + 1.0, history
    last = result.history[-1]
    # The engine's log-probs of what it sampled agree with the policy's, so the correction is ~1.
    assert last["sampler_logp_diff"] < 1e-2 and abs(last["is_ratio_mean"] - 1) < 1e-2, last
    lines = (tmp_path / "grpo" / "metrics.jsonl").read_text().splitlines()
    assert any("is_ratio_max" in json.loads(x) for x in lines)


def test_ppo_with_the_vllm_plugin_trains_full_weights_and_the_reward_rises(
    tmp_path, vllm_tiny_model, lft_prompt_data, target
):
    config = online_config(
        vllm_tiny_model,
        lft_prompt_data,
        tmp_path / "ppo",
        "ppo",
        **{
            "plugins": ["ppo", "full", "vllm"],
            "trainer.max_steps": 32,
            "trainer.lr": 3e-3,
            "trainer.batch_size": 16,
            "ppo.beta": 0.01,
        },
    )
    result = lft.run(config, plugins=[CountToken(target)], quiet=True)
    history = rewards(result)
    assert sum(history[-2:]) / 2 > sum(history[:2]) / 2 + 0.5, history
    assert result.history[-1]["sampler_logp_diff"] < 1e-2


DDP_SCRIPT = """
import json, sys
import lft

class CountToken:
    name = "count_token"
    kind = "extension"

    @lft.hookimpl
    def lft_reward(self, prompts, completions, batch, config):
        hits = (batch["completion_ids"] == 42) & batch["completion_mask"]
        return {"name": self.name, "scores": hits.sum(-1).float().tolist(), "weight": 1.0}

if __name__ == "__main__":  # Lightning starts rank 1 by running this script again
    lft.run(json.loads(sys.argv[1]), plugins=[CountToken()], quiet=True)
"""


def health(url):
    import urllib.request

    with urllib.request.urlopen(f"{url}/health", timeout=10) as response:
        return json.loads(response.read())


def test_two_processes_share_one_server_and_only_the_first_sends_weights(
    tmp_path, server, vllm_tiny_model, lft_prompt_data
):
    url, _ = server
    RemoteSampler(url, timeout=240)  # up
    before = health(url)
    port = int(url.rsplit(":", 1)[1])
    config = online_config(
        vllm_tiny_model,
        lft_prompt_data,
        tmp_path / "ddp",
        "grpo",
        **{
            "trainer.max_steps": 3,
            "trainer.lr": 1e-2,
            "grpo.num_generations": 2,
            "trainer.batch_size": 2,
            "trainer.devices": 2,
            "trainer.strategy": "ddp",
            "trainer.accelerator": "cpu",
            "vllm.mode": "server",
            "vllm.port": port,
        },
    )
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script), json.dumps(config)], capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = health(url)
    assert after["reloads"] - before["reloads"] == 3  # once per optimizer step, from the first process alone
    assert after["requests"] - before["requests"] == 6  # each process sampled its own prompts at every step
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["processes"] == 2
    records = [json.loads(x) for x in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "sampler_logp_diff" in r]
    assert len(steps) == 3 and all(r["sampler_logp_diff"] < 1e-2 for r in steps)


def test_a_third_party_online_objective_samples_through_the_plugin(tmp_path, vllm_tiny_model, lft_prompt_data, target):
    """REINFORCE with a group-mean baseline, written as a user would on the shared bases: the plugin
    samples its rollouts, and it applies the correction weights the experience brings."""
    from lft.plugins.online import OnlineMethod
    from lft.plugins.online_update import OnlineOptions, RolloutObjective

    seen = []

    class ReinforceObjective(RolloutObjective):
        def __init__(self, opts, config):
            super().__init__("reinforce", opts, config, num_generations=4)

        def prepare(self, module, exp):
            seen.append(sorted(exp))
            grouped = exp["rewards"].view(-1, 4)
            return {"advantages": (grouped - grouped.mean(1, keepdim=True)).view(-1)}

        def loss(self, module, exp, rows):
            stats = self.policy_stats(module, exp, rows)
            mask = exp["completion_mask"][rows].float()
            weights = stats["weights"] if stats.get("weights") is not None else torch.ones_like(mask)
            per_token = -exp["advantages"][rows][:, None] * stats["logps"] * weights * mask
            return per_token.sum() / mask.sum().clamp(min=1), dict(stats.get("sampling_metrics", {}))

    class Reinforce(OnlineMethod):
        name = "reinforce"
        options = OnlineOptions
        objective_class = ReinforceObjective

    config = online_config(
        vllm_tiny_model,
        lft_prompt_data,
        tmp_path / "reinforce",
        "reinforce",
        **{"plugins": ["vllm"], "trainer.max_steps": 12, "trainer.lr": 3e-2},
    )
    result = lft.run(config, plugins=[Reinforce(), CountToken(target)], quiet=True)
    history = rewards(result)
    assert sum(history[-3:]) / 3 > sum(history[:3]) / 3 + 0.5, history
    assert all("sampling_logps" in keys and "sampling_correction" in keys for keys in seen)
    assert result.history[-1]["sampler_logp_diff"] < 1e-2

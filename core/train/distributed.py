"""Scaling out through Lightning's own strategies: ``trainer.devices``, ``num_nodes``,
``strategy`` and ``precision`` become a Lightning strategy, checked before any model is loaded.

* ``auto``: one device, or DDP when several are given (Lightning's choice);
* ``ddp``: one process per device; on CPU the processes talk over gloo;
* ``fsdp``: fully sharded data parallel, on CUDA GPUs; each transformer block is one unit;
* ``deepspeed``, ``deepspeed_stage_2``, ``deepspeed_stage_3``, ...: when ``deepspeed`` is installed;
* ``model_parallel`` is refused (see ``validate``): sharding on CPU is not available yet;
* any other Lightning strategy name is passed through unchanged.

Every process runs the whole ``lft run`` (Lightning starts the extra local processes by
running the same command again; torchrun and SLURM start them all). Only the main process
(global rank 0) writes to the output folder. See docs/distributed.md.
"""

from __future__ import annotations

import importlib.util
import os
from contextlib import contextmanager
from typing import Any, Iterator

import torch

from lft.errors import ConfigError


def is_main_process() -> bool:
    """True in the process that should write outputs, judged from the launcher's environment
    (torchrun, SLURM, Lightning's own launcher) before any Trainer exists."""
    for key in ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK"):
        if int(os.environ.get(key) or 0) != 0:
            return False
    if int(os.environ.get("SLURM_NTASKS") or 1) > 1 and int(os.environ.get("SLURM_PROCID") or 0) != 0:
        return False
    return True


def _cuda(accelerator: str) -> bool:
    return accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()


def validate(tc: Any) -> None:
    """Refuse, in one line and before loading anything, a strategy this machine cannot run."""
    name = tc.strategy.lower()
    if name.startswith("fsdp") and not _cuda(tc.accelerator):
        raise ConfigError(
            f"trainer.strategy={tc.strategy} needs CUDA GPUs in Lightning; on CPU use "
            "trainer.strategy=ddp (replicated weights) or trainer.strategy=model_parallel (sharded)"
        )
    if name.startswith("deepspeed") and importlib.util.find_spec("deepspeed") is None:
        raise ConfigError(f"trainer.strategy={tc.strategy} needs the deepspeed package: pip install deepspeed")
    if name.startswith("deepspeed") and not _cuda(tc.accelerator):
        raise ConfigError(f"trainer.strategy={tc.strategy} needs CUDA GPUs")
    if name == "model_parallel":
        raise ConfigError(
            "trainer.strategy=model_parallel is not supported: lft's log-prob code reads the output "
            "head's weight outside the model's forward, which FSDP2 keeps sharded there; use "
            "trainer.strategy=ddp on CPU or trainer.strategy=fsdp on GPUs"
        )
    if tc.precision == "16-mixed" and not _cuda(tc.accelerator):
        raise ConfigError("trainer.precision=16-mixed needs a CUDA GPU; on CPU use 32-true or bf16-mixed")


class LayerWrapPolicy:
    """FSDP auto-wrap policy: each transformer block (the classes a transformers model lists in
    ``_no_split_modules``) becomes its own FSDP unit. Found from the module being wrapped, so
    it needs no model up front."""

    def __init__(self) -> None:
        self.names: set[str] | None = None

    def __call__(self, module: torch.nn.Module, recurse: bool, nonwrapped_numel: int = 0) -> bool:
        if self.names is None:  # the first call is on the root module
            self.names = set()
            for sub in module.modules():
                self.names.update(getattr(sub, "_no_split_modules", None) or [])
        if recurse:
            return True
        return type(module).__name__ in self.names


def strategy(tc: Any) -> Any:
    """The Lightning strategy (an object, or a name Lightning resolves) for ``trainer.strategy``."""
    name = tc.strategy.lower()
    if name == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        backend = None if _cuda(tc.accelerator) else "gloo"
        return DDPStrategy(process_group_backend=backend)
    if name == "fsdp":
        from lightning.pytorch.strategies import FSDPStrategy

        # use_orig_params lets frozen and trained weights (LoRA) share one FSDP unit;
        # "full" gathers the trained weights into one lft checkpoint file on rank 0.
        return FSDPStrategy(
            auto_wrap_policy=LayerWrapPolicy(),
            use_orig_params=True,
            state_dict_type="full",
            sharding_strategy="FULL_SHARD",
        )
    return tc.strategy


@contextmanager
def full_weights(trainer: Any, model: torch.nn.Module) -> Iterator[None]:
    """Let rank 0 save the full weights of ``model`` (the LftModule's ``model``) when a sharded
    strategy holds only a slice of them in each process: the strategy gathers them (a
    collective, so every process enters this together) and, while the block runs,
    ``model.state_dict()`` on rank 0 returns the gathered tensors, which is what
    ``save_pretrained`` (transformers and peft) reads. A no-op for unsharded strategies."""
    if type(trainer.strategy).__name__ not in ("FSDPStrategy", "DeepSpeedStrategy"):
        yield
        return
    gathered = trainer.strategy.lightning_module_state_dict()  # full on rank 0, CPU-offloaded
    prefix = "model."
    full = {key[len(prefix) :]: value for key, value in gathered.items() if key.startswith(prefix)}
    model.state_dict = lambda *args, **kwargs: dict(full)  # type: ignore[method-assign, assignment]  # undone below
    try:
        yield
    finally:
        del model.state_dict  # back to the class's method

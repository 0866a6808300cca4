"""Numerical faults: a NaN or Inf loss or gradient stops the run or skips the optimizer step
(``trainer.on_nonfinite``), with a message that names the step and the rows of the batch.

The check runs before the optimizer step, so the weights and the optimizer state never see a
non-finite update:

* ``stop`` raises ``NonFiniteError`` there; nothing more is saved, so the last checkpoint in
  ``checkpoints/`` is the last good state;
* ``skip`` drops the step's gradients (sets them to None), which AdamW treats as "no update":
  neither the weights nor the moment estimates nor the step count change. The step still counts
  toward ``max_steps`` and the schedule, and it is marked ``nonfinite_skipped`` in metrics.jsonl.
  After ``MAX_CONSECUTIVE_SKIPS`` skipped steps in a row the run stops anyway: the model is not
  recovering.

Under ``16-mixed`` precision the GradScaler already skips steps whose gradients overflow, so
only the loss is checked there. Under DDP every process takes the same decision.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch

from lft.errors import LftError

MAX_CONSECUTIVE_SKIPS = 20


CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_bf16_flags() -> list[str]:
    """The bf16 instruction sets this CPU lists in /proc/cpuinfo (of ``CPU_BF16_FLAGS``); empty when unknown."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    return [flag for flag in CPU_BF16_FLAGS if flag in flags]


def native_bf16_cpu() -> bool:
    """Whether this CPU does bf16 arithmetic in hardware (AVX512-BF16 or AMX); False when unknown."""
    return bool(cpu_bf16_flags())


class NonFiniteError(LftError):
    """The loss or the gradient became NaN or Inf."""


def _nonfinite_grad(parameters: Any) -> str | None:
    for name, param in parameters:
        if param.grad is not None and not bool(torch.isfinite(param.grad).all()):
            return name
    return None


class NonFiniteGuard(L.Callback):
    def __init__(self, policy: str = "stop", output: str | Path | None = None, check_gradients: bool = True):
        if policy not in ("stop", "skip"):
            raise ValueError(f"trainer.on_nonfinite must be stop or skip, got {policy!r}")
        self.policy = policy
        self.output = Path(output) if output else None
        self.check_gradients = check_gradients
        self.skipped: list[int] = []
        self._consecutive = 0
        self._served = 0
        self._batches: list[str] = []  # descriptions of this optimizer step's micro-batches
        self._bad_loss: str | None = None

    # -- where the batch came from -------------------------------------------------------------
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._served += 1
        self._batches.append(self._describe(trainer, batch_idx))

    def _describe(self, trainer: L.Trainer, batch_idx: int) -> str:
        loader = getattr(trainer, "train_dataloader", None)
        rows = loader.rows_of(self._served - 1) if loader is not None and hasattr(loader, "rows_of") else None
        text = f"epoch {trainer.current_epoch} batch {batch_idx}"
        if rows:
            shown = ", ".join(rows[:4]) + (f" and {len(rows) - 4} more" if len(rows) > 4 else "")
            text += f" (rows {shown})"
        return text

    # -- checks ----------------------------------------------------------------------------------
    def on_before_backward(self, trainer: L.Trainer, pl_module: Any, loss: torch.Tensor) -> None:
        if self._bad_loss is None and not bool(torch.isfinite(loss.detach()).all()):
            self._bad_loss = (
                f"loss ({float(loss.detach().float().reshape(-1)[0])}) in {self._batches[-1]}"
                if self._batches
                else "loss"
            )

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: Any, optimizer: Any) -> None:
        problem = self._bad_loss
        if problem is None and self.check_gradients:
            name = _nonfinite_grad(pl_module.named_parameters())
            if name is not None:
                problem = f"gradient of {name} in {'; '.join(self._batches) or 'this step'}"
        bad = problem is not None
        if trainer.world_size > 1:
            bad = bool(trainer.strategy.reduce_boolean_decision(bad, all=False))
            if bad and problem is None:
                problem = "loss or gradient in another process's batch"
        self._bad_loss = None
        self._batches = []
        step = trainer.global_step + 1  # metrics.jsonl counts steps from 1
        if not bad:
            self._consecutive = 0
            return
        if self.policy == "stop":
            raise NonFiniteError(
                f"non-finite {problem} at step {step}; stopped before updating the weights. "
                f"{self._last_good()} Lower trainer.lr, check those rows, or set "
                "trainer.on_nonfinite=skip to skip such steps"
            )
        for group in optimizer.param_groups:
            for param in group["params"]:
                param.grad = None
        self.skipped.append(step)
        self._consecutive += 1
        metrics = pl_module.last_metrics
        if isinstance(metrics, dict):
            metrics["nonfinite_skipped"] = 1.0
        if trainer.global_rank == 0:
            print(f"warning: non-finite {problem} at step {step}; step skipped (trainer.on_nonfinite=skip)", flush=True)
        if self._consecutive >= MAX_CONSECUTIVE_SKIPS:
            raise NonFiniteError(
                f"{self._consecutive} optimizer steps in a row had a non-finite loss or gradient "
                f"(the last at step {step}); stopped. {self._last_good()} Lower trainer.lr"
            )

    def _last_good(self) -> str:
        if self.output is None:
            return ""
        ckpt = self.output / "checkpoints" / "last.ckpt"
        if ckpt.exists():
            return f"The last good checkpoint, {ckpt}, is kept; continue from it with --resume."
        return "No checkpoint had been saved yet (see trainer.checkpoint_every)."

"""The LightningModule of every lft run. It knows no method: it calls the rollout hook and the
objective that ``lft_objective`` returned, and it builds the optimizer and schedule from the config."""

from __future__ import annotations

import functools
import math
import operator
from typing import Any

import lightning as L
import torch

from lft.objective import Objective, OnlineObjective


def _scalar(value: Any) -> float:
    return float(value.detach().float().item()) if torch.is_tensor(value) else float(value)


class LftModule(L.LightningModule):
    """Wraps the model, the objective and the run's hook relay.

    Objectives (``lft.objective.Objective``) read ``module.model``, ``module.tokenizer``,
    ``module.config`` and ``module.hook``. Each micro-batch's loss is weighted by its share of the
    units (``objective.units``) of its whole optimizer step, over every process, as
    ``lft.objective`` describes. An objective with ``needs_reference`` also gets
    ``module.reference``, the model as it was before training, taken in ``prepare``. An online
    objective (``lft.objective.OnlineObjective``) takes over the whole step in ``training_step``
    and steps the optimizer itself (manual optimization).
    """

    def __init__(self, model: Any, tokenizer: Any, objective: Objective, hook: Any, config: Any):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.objective = objective
        self.hook = hook
        self.config = config
        self.strict_loading = False  # checkpoints hold only the trained weights
        self.last_metrics: dict[str, float] = {}
        self.reference: Any = None
        self.automatic_optimization = not objective.steps_optimizer
        self._step_key: Any = None  # the optimizer step whose counts are in _step_units
        self._step_units: dict = {}

    def prepare(self) -> None:
        """Take the reference and set the objective up; the engine calls it once, before the
        measurements that precede training (and so before a resume loads weights)."""
        if self.objective.needs_reference:
            from lft.model.reference import ReferencePolicy

            self.reference = ReferencePolicy.of(self.model)
        self.objective.setup(self)

    def on_fit_start(self) -> None:
        if self.config.trainer.fused_mlp:
            from lft.model.fused import fuse_swiglu

            fuse_swiglu(self.model)
        if self.config.trainer.segment_attention and not self.config.trainer.compile:
            from lft.model.attention import use_segment_attention

            for model in (self.model, getattr(self.reference, "_frozen", None)):
                if model is not None:
                    use_segment_attention(model)
        if self.config.trainer.compile:
            for layer in transformer_layers(self.model):
                layer.compile(dynamic=True, backend=self.config.trainer.compile_backend)

    def on_fit_end(self) -> None:
        from lft.model.attention import use_sdpa

        use_sdpa(self.model)  # the saved and evaluated model names the stock implementation
        for layer in transformer_layers(self.model):
            layer._compiled_call_impl = None  # the saved and evaluated model is the plain one

    def forward(self, **inputs: Any) -> Any:
        return self.model(**inputs)

    def compute(self, batch: dict) -> tuple[torch.Tensor, dict]:
        """The objective's loss of one batch as one scalar (its terms over each unit added up)."""
        loss, metrics = self.objective(self, batch)
        return combine_terms(loss), dict(metrics or {})

    def step_totals(self, step: dict | None, batch: dict) -> tuple[dict, dict, int]:
        """``(units of this micro-batch, units of its whole optimizer step over every process,
        micro-batches in the step)``. The step's counts come from the loader (``STEP_KEY``) and
        are summed over the processes once per step."""
        from lft.objective import reduce_units, units_of

        if step is None:  # a batch that did not come from lft's loader: it is a step of its own
            units = units_of(self.objective, batch)
            step = {"step": None, "units": units, "totals": units, "size": 1}
        key = step["step"]
        if key is None or key != self._step_key:
            self._step_key = key
            attached = self._trainer is not None
            self._step_units = reduce_units(
                step["totals"], self.trainer.strategy if attached else None, self.trainer.world_size if attached else 1
            )
        return step["units"], self._step_units, int(step["size"])

    def training_step(self, batch: dict, batch_idx: int) -> Any:
        from lft.data.loader import STEP_KEY
        from lft.objective import step_share

        step = batch.pop(STEP_KEY, None)
        streamed = batch.pop("lft_stream_rows", None)  # lft.data.stream: how far this batch reached
        if streamed is not None and self._trainer is not None:
            mark = getattr(self.trainer.train_dataloader, "mark_trained", None)
            if mark is not None:
                mark(streamed)
        experience = self.hook.lft_rollout(module=self, batch=batch, config=self.config)
        if experience is not None:
            batch, step = experience, None  # the step's counts are those of the experience
        if isinstance(self.objective, OnlineObjective):  # it steps the optimizer itself
            loss, metrics = self.objective.training_step(self, batch)
            logged = loss
        else:
            terms, metrics = self.objective(self, batch)
            units, totals, size = self.step_totals(step, batch)
            share = step_share(terms, units, totals)
            world = self.trainer.world_size if self._trainer is not None else 1
            accumulate = self.trainer.accumulate_grad_batches if self._trainer is not None else 1
            # Lightning divides by the accumulation and DDP averages over processes: undo both, so
            # the gradient is that of the step's loss as one batch.
            loss = share * (accumulate * world)
            logged = share.detach() * (size * world)  # averaged over the step's micro-batches and processes
        metrics = {k: _scalar(v) for k, v in (metrics or {}).items()}
        metrics["loss"] = _scalar(logged)  # a NaN/Inf loss is handled by lft.train.numerics.NonFiniteGuard
        self.last_metrics = metrics
        # The trackers get the step's record from lft.train.callbacks.RunMonitor, as metrics.jsonl does.
        self.log("train/loss", metrics["loss"], prog_bar=False, logger=False, batch_size=1)
        return loss

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        """The step's gradient norm, before clipping, joins the step's metrics (automatic
        optimization; objectives that step themselves report their own)."""
        if self.automatic_optimization:
            self.last_metrics["grad_norm"] = gradient_norm(self.parameters())

    def on_validation_epoch_start(self) -> None:
        from lft.objective import HeldOutLoss

        self._held_out = HeldOutLoss()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """The held-out loss is that of the whole set as one batch, as ``lft.use.evaluate.objective_loss``
        computes it after training."""
        from lft.objective import units_of

        loss, _ = self.objective(self, batch)
        self._held_out.add(loss, units_of(self.objective, batch))

    def on_validation_epoch_end(self) -> None:
        # Every process evaluates all the held-out rows (no distributed sampler), so nothing to reduce.
        loss = self._held_out.value()
        if loss is not None:
            self.log("eval/loss", loss, on_epoch=True, on_step=False, batch_size=1, logger=False)

    def configure_optimizers(self) -> Any:
        cfg = self.config.trainer
        decay: list[torch.nn.Parameter] = []
        no_decay: list[torch.nn.Parameter] = []
        for _, param in self.named_parameters():  # the model, and any module an objective attached (a critic)
            if param.requires_grad:
                (decay if param.ndim >= 2 else no_decay).append(param)
        if not decay and not no_decay:
            raise RuntimeError("the model has no trainable parameters")
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=tuple(cfg.adam_betas))
        from transformers import get_scheduler

        total = max(1, int(self.trainer.estimated_stepping_batches))
        if isinstance(self.objective, OnlineObjective) and cfg.max_steps <= 0:  # several optimizer steps per batch
            total *= self.objective.updates_per_batch
        warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(math.ceil(cfg.warmup_ratio * total))
        name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[cfg.schedule]
        scheduler = get_scheduler(name, optimizer, num_warmup_steps=min(warmup, total), num_training_steps=total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Frozen weights are reloaded from the base model on resume; keep only what trains.
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        checkpoint["lft_config"] = self.config.model_dump(mode="json")
        checkpoint["lft_objective"] = self.objective.state_dict()  # e.g. an adaptive KL coefficient

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if checkpoint.get("lft_objective"):
            self.objective.load_state_dict(checkpoint["lft_objective"])


def gradient_norm(parameters: Any) -> float:
    """The L2 norm of all the gradients of ``parameters`` together (0 when there are none)."""
    grads = [p.grad.detach() for p in parameters if p.grad is not None]
    if not grads:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))


def combine_terms(loss: Any) -> torch.Tensor:
    """A loss given as ``{unit: mean}`` terms, added up into one scalar (a tensor stays as it is)."""
    if isinstance(loss, dict):
        values = list(loss.values())
        return functools.reduce(operator.add, values[1:], values[0])
    return loss


def transformer_layers(model: Any) -> list[torch.nn.Module]:
    """The repeated blocks of a transformer: the members of its longest ``ModuleList``."""
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 0]
    if not lists:
        return []
    longest = max(lists, key=len)
    return list(longest)

"""The update loop of the online methods (ppo, grpo): their shared options, several optimizer
steps per rollout batch under manual optimization, the per-step metrics and the sample log.
``lft.plugins.online`` holds the plugin side (prompt data, collation, the embedded defaults).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Literal, Mapping

import torch
from pydantic import Field

import lft
from lft.config import Section
from lft.losses.ppo import kl_estimate, masked_mean
from lft.losses.sampling import correction_weights
from lft.model.forward import completion_stats
from lft.objective import OnlineObjective, RowTexts
from lft.online.rewards import reward_plugins
from lft.online.rollout import RolloutSettings, experience
from lft.train.module import gradient_norm

log = logging.getLogger("lft")


class OnlineOptions(Section):
    max_new_tokens: int = Field(64, gt=0, description="Longest completion sampled, in tokens.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of the rollout.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling: keep the smallest token set with this mass.")
    epochs: int = Field(1, gt=0, description="Passes over each rollout batch.")
    minibatches: int = Field(
        1, gt=0, description="Optimizer steps per pass; the rollout batch is split this many ways."
    )
    generation_batch_size: int = Field(0, ge=0, description="Sequences generated at once; 0 means the whole batch.")
    kl_estimator: Literal["k1", "k3"] = Field(
        "k3", description="KL estimator per token: k1 (log-ratio) or k3 (never negative)."
    )
    kl_warning: float | None = Field(
        10.0, gt=0, description="Warn when the mean KL to the reference per completion passes this."
    )
    samples_to_log: int = Field(
        2, ge=0, description="Completions per step appended to samples.jsonl in the output folder."
    )
    use_chat_template: bool = Field(True, description="Format string prompts as a user turn with the chat template.")


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    """Correlation of two equal-length vectors (0 when either is constant)."""
    x, y = x.float() - x.float().mean(), y.float() - y.float().mean()
    denominator = (x.square().sum() * y.square().sum()).sqrt()
    return float((x * y).sum() / denominator) if denominator > 0 else 0.0


class RolloutObjective(OnlineObjective):
    """Runs the update loop of an online method: ``epochs`` x ``minibatches`` optimizer steps per
    rollout batch, under Lightning manual optimization, with clipping and the LR schedule.

    Subclasses implement ``prepare(module, exp) -> dict`` (advantages and the like, with no
    gradient) and ``loss(module, exp, rows) -> (loss, metrics)`` on the rows of one minibatch.
    """

    progress_metrics: tuple[str, ...] = ("reward", "kl")
    runs_padding_free = True
    #: Consecutive experience rows the loss reads together (online DPO's samples of one prompt):
    #: minibatches and micro-batches never split them.
    rows_together = 1
    summary_metrics = ("reward",)
    reward_metric: str | None = "reward"

    def row_texts(self, row: Mapping[str, Any]) -> RowTexts:
        """Only the prompt: the policy writes its own answers (other columns are for the rewards)."""
        return RowTexts(prompts=[row["prompt"]] if "prompt" in row else [])

    def __init__(
        self,
        name: str,
        opts: OnlineOptions,
        config: Any,
        num_generations: int = 1,
        needs_reference: bool = False,
        value_states: bool = False,
    ):
        self.name = name
        self.opts = opts
        self.config = config
        self.needs_reference = needs_reference
        self.updates_per_batch = opts.epochs * opts.minibatches
        # With one update per batch, the update's forward pass gives the rollout policy's log-probs.
        self.rollout = RolloutSettings(
            max_new_tokens=opts.max_new_tokens,
            temperature=opts.temperature,
            top_p=opts.top_p,
            num_generations=num_generations,
            reference=needs_reference,
            hidden=value_states,
            generation_batch_size=opts.generation_batch_size,
            policy_logps=self.updates_per_batch > 1 or value_states,
            padding_free=config.data.padding_free,
        )
        self.eval_rollout = RolloutSettings(
            max_new_tokens=opts.max_new_tokens,
            temperature=0.0,
            generation_batch_size=opts.generation_batch_size,
            policy_logps=False,
        )
        self.warnings: list[str] = []
        self._warned: set[str] = set()
        self.notes: dict[str, Any] = {}
        self.samples_path = Path(config.output) / "samples.jsonl"
        self._totals = {"rollout_s": 0.0, "update_s": 0.0, "generation_s": 0.0, "generated_tokens": 0}

    # -- set-up --------------------------------------------------------------------------------
    def setup(self, module: Any) -> None:
        if not reward_plugins(module.hook):
            raise lft.PluginError(
                "no reward function is selected: add one, e.g. --plugin exact_answer (checks an "
                "'answer' column), --plugin reward_model reward_model.path=DIR, or your own reward plugin"
            )
        every = self.config.trainer.checkpoint_every
        if every and every % self.updates_per_batch:
            self.note_warning(
                f"trainer.checkpoint_every={every} is not a multiple of the {self.updates_per_batch} "
                f"optimizer steps per rollout batch; checkpoints are saved only at common multiples"
            )

    def note_warning(self, text: str, kind: str | None = None) -> None:
        """Add a warning to the run summary and print it, once per ``kind``."""
        kind = kind or text
        if kind not in self._warned:
            self._warned.add(kind)
            self.warnings.append(text)
            log.warning("warning: %s", text)

    # -- evaluation: a greedy rollout on held-out prompts --------------------------------------------
    def __call__(self, module: Any, batch: Mapping[str, Any]) -> tuple[torch.Tensor, dict]:
        exp = experience(module, batch, self.eval_rollout)
        metrics = {"reward": exp["rewards"].mean()}
        metrics.update({f"reward_{k}": v.mean() for k, v in exp["reward_scores"].items()})
        metrics["completion_length"] = exp["completion_mask"].sum(-1).float().mean()
        return -exp["rewards"].mean(), metrics

    # -- training ----------------------------------------------------------------------------------
    def policy_stats(self, module: Any, exp: dict, rows: torch.Tensor, hidden: bool = False) -> dict:
        """Log-probs (with gradient) of the completion tokens of ``rows``, shape (n, C), and the
        rollout policy's (``old_logps``). When the rollout did not score the tokens (one update
        per batch), they are this pass's own, detached, and the entropy comes from this pass too.
        When another engine sampled the tokens (``sampling_logps``, e.g. vLLM), ``weights`` holds
        the importance-sampling correction per token (``lft.losses.sampling``) for the loss to
        apply (None with the correction off), and ``sampling_metrics`` how far the engine's
        log-probs were from the policy's."""
        fresh = "logps" not in exp
        stats = completion_stats(
            module.model,
            exp["input_ids"][rows],
            exp["attention_mask"][rows],
            exp["labels"][rows],
            exp["prompt_length"],
            self.config.trainer.logits_chunk,
            self.rollout.temperature,
            entropy=fresh,
            hidden=hidden,
            position_ids=exp["position_ids"][rows],
            groups=exp["prompt_index"][rows] if "prompt_index" in exp else None,
            padding_free=self.config.data.padding_free,
        )
        logps = stats["logps"]
        out = {"logps": logps, "old_logps": logps.detach() if fresh else exp["logps"][rows]}
        if fresh:  # kept for the step's metrics
            for key, value in (("update_logps", logps.detach()), ("update_entropy", stats["entropy"])):
                exp.setdefault(key, value.new_zeros(exp["completion_mask"].shape))[rows] = value
            exp.setdefault("update_scored", torch.zeros_like(exp["stopped"], dtype=torch.bool))[rows] = True
        if hidden:
            out["hidden"] = stats["hidden"]
        if "sampling_logps" in exp:
            out["weights"], out["sampling_metrics"] = correction_weights(
                out["old_logps"], exp["sampling_logps"][rows], exp["completion_mask"][rows], exp["sampling_correction"]
            )
        return out

    def prepare(self, module: Any, exp: dict) -> dict:
        return {}

    def loss(self, module: Any, exp: dict, rows: torch.Tensor) -> tuple[Any, dict]:
        """``(loss, metrics)`` of the experience ``rows``: the loss as means over the units that
        ``rows_units`` counts (one tensor for one unit, or ``{unit: mean}``), as in ``lft.objective``."""
        raise NotImplementedError

    def rows_units(self, exp: dict, rows: torch.Tensor) -> dict:
        """What the loss of ``rows`` averages over (``lft.objective``): completion tokens by default."""
        return {"tokens": exp["completion_mask"][rows].sum()}

    def finished(self, module: Any) -> bool:
        max_steps = self.config.trainer.max_steps
        return max_steps > 0 and module.global_step >= max_steps

    def update(self, module: Any, exp: dict, rows: torch.Tensor) -> tuple[torch.Tensor, list[dict]]:
        """One optimizer step on the experience ``rows``, in ``trainer.grad_accum`` micro-batches.
        Each micro-batch's loss is weighted by its share of the units of the whole step, counted
        over every process (one all-reduce), so the update is that of all the rows as one batch
        whatever the micro-batching or the number of processes. Returns the step's loss."""
        from lft.objective import add_units, as_units, reduce_units, step_share

        optimizer = module.optimizers()
        g = self.rows_together
        parts = torch.tensor_split(rows.view(-1, g), min(self.config.trainer.grad_accum, len(rows) // g))
        micro = [part.flatten() for part in parts if len(part)]
        counts = [as_units(self.rows_units(exp, part)) for part in micro]
        strategy = module.trainer.strategy if module._trainer is not None else None
        world = module.trainer.world_size if module._trainer is not None else 1
        totals = reduce_units(add_units(counts), strategy, world)
        total, collected = torch.zeros(()), []
        for part, units in zip(micro, counts):
            loss, metrics = self.loss(module, exp, part)
            share = step_share(loss, units, totals)
            module.manual_backward(share * world)  # DDP averages the processes' gradients
            total = total + share.detach().float().cpu() * world
            collected.append({k: float(v) for k, v in metrics.items()})
        collected[-1]["grad_norm"] = gradient_norm(module.parameters())  # before clipping
        if self.config.trainer.max_grad_norm:
            module.clip_gradients(
                optimizer, gradient_clip_val=self.config.trainer.max_grad_norm, gradient_clip_algorithm="norm"
            )
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler = module.lr_schedulers()
        if scheduler is not None:
            scheduler.step()
        return total, collected

    def training_step(self, module: Any, exp: dict[str, Any]) -> tuple[torch.Tensor, dict]:
        started = time.perf_counter()
        exp.update(self.prepare(module, exp))
        n, g, device = exp["completion_ids"].shape[0], self.rows_together, exp["completion_ids"].device
        size = -(-n // g // self.opts.minibatches) * g
        losses, collected = [], []
        for _ in range(self.opts.epochs):
            order = (torch.randperm(n // g, device=device)[:, None] * g + torch.arange(g, device=device)).flatten()
            for start in range(0, n, size):
                if self.finished(module):
                    break
                loss, update_metrics = self.update(module, exp, order[start : start + size])
                losses.append(loss)
                collected.extend(update_metrics)
        update_s = time.perf_counter() - started
        metrics = self.step_metrics(exp, update_s, module.global_step)
        for key in {k for c in collected for k in c}:
            values = [c[key] for c in collected if key in c]
            metrics[key] = sum(values) / len(values)
        self.log_samples(module, exp)
        return torch.stack(losses).mean() if losses else torch.zeros(()), metrics

    # -- what is logged ----------------------------------------------------------------------------
    def step_metrics(self, exp: dict, update_s: float, step: int) -> dict:
        mask = exp["completion_mask"]
        lengths = mask.sum(-1).float()
        rewards = exp["rewards"].float()
        timing = exp["timings"]
        rollout_s = timing["generation_s"] + timing["scoring_s"] + timing["reward_s"]
        metrics = {
            "reward": rewards.mean(),
            "reward_std": rewards.std() if rewards.numel() > 1 else 0.0,
            "completion_length": lengths.mean(),
            "completion_length_max": lengths.max(),
            "stopped": exp["stopped"].float().mean(),
            "reward_length_corr": pearson(rewards, lengths),
            "rollout_s": rollout_s,
            "update_s": update_s,
            "generation_tokens_per_s": timing["generated_tokens"] / max(timing["generation_s"], 1e-9),
            "generation_s": timing["generation_s"],
            "generated_tokens": timing["generated_tokens"],
        }
        entropy, logps = exp.get("entropy", exp.get("update_entropy")), exp.get("logps", exp.get("update_logps"))
        scored = exp.get("update_scored") if "logps" not in exp else None
        if scored is not None:  # only the rows this step's update scored (online DPO's pairs)
            mask = mask & scored[:, None].to(mask.device)
        if entropy is not None:
            metrics["entropy"] = masked_mean(entropy, mask)
        for name, scores in exp["reward_scores"].items():
            metrics[f"reward_{name}"] = scores.mean()
            metrics[f"reward_{name}_std"] = scores.std() if scores.numel() > 1 else 0.0
        if "ref_logps" in exp and logps is not None:
            per_row = (kl_estimate(logps, exp["ref_logps"], self.opts.kl_estimator) * mask).sum(-1)
            kl = per_row[scored].mean() if scored is not None and bool(scored.any()) else per_row.mean()
            metrics["kl"] = kl
            if self.opts.kl_warning and float(kl) > self.opts.kl_warning:
                self.note_warning(
                    f"the KL to the reference ({float(kl):.3g} per completion) passed "
                    f"{self.name}.kl_warning={self.opts.kl_warning:g} at step {step}; the policy is "
                    f"drifting far from where it started",
                    kind="kl",
                )
        totals = self._totals
        totals["rollout_s"] += rollout_s
        totals["update_s"] += update_s
        totals["generation_s"] += timing["generation_s"]
        totals["generated_tokens"] += timing["generated_tokens"]
        self.notes = {
            "rollout_time_s": round(totals["rollout_s"], 2),
            "update_time_s": round(totals["update_s"], 2),
            "rollout_tokens_per_s": round(totals["generated_tokens"] / max(totals["generation_s"], 1e-9), 1),
        }
        return metrics

    def log_samples(self, module: Any, exp: dict) -> None:
        count = min(self.opts.samples_to_log, len(exp["completions"]))
        if not count or module.global_rank != 0:
            return
        lines = []
        for i in range(count):
            row = {
                "step": int(module.global_step),
                "prompt": exp["prompts"][i],
                "completion": exp["completions"][i],
                "reward": float(exp["rewards"][i]),
            }
            row.update({name: float(s[i]) for name, s in exp["reward_scores"].items()})
            lines.append(json.dumps(row, ensure_ascii=False, default=str) + "\n")
        self.samples_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.samples_path, "a", encoding="utf-8") as handle:
            handle.writelines(lines)

"""The guards that watch training: the eval curve (overfitting, early stopping, best weights), the
adapter rank, and the before/after measurements (repetition of sampled answers, forgetting).

``GuardMonitor`` is a Lightning callback that lft's core plugin adds to every run. The base model is
measured when fitting starts and its numbers are kept in ``guards/base.json`` in the output folder,
so a resumed run compares against the same base. ``summarize`` turns everything into findings.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import lightning as L

from lft.data import chat, task
from lft.data.files import read_rows
from lft.guards import everyday, measure
from lft.guards.findings import Finding, add_to_summary, skipped

GENERAL_RETAIN = task.ASSETS / "general-retain.jsonl"


def adapter_rank(model: Any) -> int | None:
    """The rank of the model's (peft) low-rank adapter, or None when it has none."""
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict):
        return None
    found = [getattr(c, "r", None) for c in configs.values()]
    ranks = [r for r in found if isinstance(r, int)]
    return min(ranks) if ranks else None


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


class GuardMonitor(L.Callback):
    def __init__(self, config: Any):
        self.config = config
        self.opts = config.section("guards")
        self.online = False
        self.points: list[dict] = []  # {"step", "eval_loss", "train_loss"} per evaluation
        self.best: dict | None = None
        self.bad_evals = 0
        self.stopped_early_at: int | None = None
        self.restored_step: int | None = None
        self.rank: int | None = None
        self.base: dict = {}
        self.after: dict = {}
        self.notes: dict[str, str] = {}
        self._train_losses: list[float] = []
        self._best_weights: dict | None = None
        self.seconds = 0.0  # spent measuring the model before and after training

    # -- the eval curve ------------------------------------------------------------------------
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        loss = pl_module.last_metrics.get("loss")
        if loss is not None:
            self._train_losses.append(float(loss))

    def on_validation_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        value = trainer.callback_metrics.get("eval/loss")
        if trainer.sanity_checking or value is None:
            return
        point = {"step": trainer.global_step, "eval_loss": float(value), "train_loss": _mean(self._train_losses)}
        self._train_losses = []
        self.points.append(point)
        opts = self.opts.overfit
        if self.best is None or point["eval_loss"] < self.best["eval_loss"] - opts.min_delta:
            self.best, self.bad_evals = point, 0
            if opts.restore_best:
                self._best_weights = {
                    n: p.detach().to("cpu", copy=True) for n, p in pl_module.model.named_parameters() if p.requires_grad
                }
            return
        self.bad_evals += 1
        if opts.early_stopping and self.bad_evals >= opts.patience:
            trainer.should_stop = True
            self.stopped_early_at = trainer.global_step

    def state_dict(self) -> dict:
        return {"points": self.points, "best": self.best, "bad_evals": self.bad_evals}

    def load_state_dict(self, state: dict) -> None:
        self.points = list(state.get("points", []))
        self.best = state.get("best")
        self.bad_evals = int(state.get("bad_evals", 0))

    # -- before and after ------------------------------------------------------------------------
    def on_fit_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.online = pl_module.objective.online
        self.rank = adapter_rank(pl_module.model)
        if not (self.opts.on("repetition") or self.opts.on("forgetting")):
            return
        if trainer.world_size > 1:
            self.notes["model"] = "not measured with more than one device"
            return
        path = Path(self.config.output) / "guards" / "base.json"
        if path.is_file():
            self.base = json.loads(path.read_text(encoding="utf-8"))
        elif trainer.global_step == 0:
            self.base = self.measure(pl_module, trainer, base=None)
            from lft.output.summary import write_json

            path.parent.mkdir(parents=True, exist_ok=True)
            write_json(path, self.base)
        else:
            self.notes["model"] = "resumed without the base model's measurements"

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if (
            self._best_weights is not None
            and self.best
            and self.points
            and self.points[-1]["step"] != self.best["step"]
        ):
            params = dict(pl_module.model.named_parameters())
            for name, value in self._best_weights.items():
                params[name].data.copy_(value.to(params[name].device))
            self.restored_step = self.best["step"]
        interrupted = trainer.should_stop and self.stopped_early_at is None
        if self.base and not interrupted and trainer.global_rank == 0:
            self.after = self.measure(pl_module, trainer, base=self.base)

    def measure(self, module: Any, trainer: L.Trainer, base: dict | None) -> dict:
        """Repetition and retain numbers of the model as it is now; with ``base``, on the base's own
        prompts and samples."""
        started = time.perf_counter()
        try:
            return self._measure(module, trainer, base)
        finally:
            self.seconds += time.perf_counter() - started

    def _measure(self, module: Any, trainer: L.Trainer, base: dict | None) -> dict:
        out: dict[str, Any] = {}
        seed = self.config.trainer.seed
        if self.opts.on("repetition") and (base is None or "repetition" in base):
            rep = self.opts.repetition
            prompts = base["repetition"]["prompts"] if base else self._held_out_prompts(trainer, rep.samples)
            if prompts:
                samples = measure.sample(
                    module.model, module.tokenizer, prompts, rep.max_new_tokens, rep.temperature, seed
                )
                out["repetition"] = {"prompts": prompts, **measure.generation_stats(samples)}
                out["repetition"]["answers"] = [
                    module.tokenizer.decode(s, skip_special_tokens=True) for s, _ in samples[:3]
                ]
        if self.opts.on("forgetting") and (base is None or "forgetting" in base):
            out["forgetting"] = self._retain(module, base["forgetting"] if base else None, seed)
        if self.opts.on("forgetting") and self.opts.forgetting.everyday and (base is None or "everyday" in base):
            out["everyday"] = self._everyday(module, trainer, base["everyday"] if base else None, seed)
        return out

    def _everyday(self, module: Any, trainer: L.Trainer, base: dict | None, seed: int) -> dict:
        """Greedy answers to the everyday prompts and to two-turn conversations that start with one
        of the task's exchanges; for the base model, the task's format too (``everyday``)."""
        opts, tokenizer = self.opts.forgetting, module.tokenizer
        features = getattr(getattr(trainer, "datamodule", None), "train_features", None) or []
        if base is None:
            questions = everyday.read_prompts(opts.prompts, opts.everyday)
            prompt_ids = [
                list(tokenizer(chat.prompt_text(tokenizer, q), add_special_tokens=False)["input_ids"])
                for q in questions
            ]
            second = [q for q in questions if isinstance(q, str)]
            conversation_ids = everyday.conversations(tokenizer, features, second, opts.conversations)
            shown = [q if isinstance(q, str) else str(q[-1].get("content", q)) for q in questions]
            asked = {
                "everyday": shown,
                "conversation": [f"(after a task exchange) {q}" for q in second[: len(conversation_ids)]],
            }
        else:
            prompt_ids, conversation_ids, asked = base["prompt_ids"], base["conversation_ids"], base["questions"]
        out: dict[str, Any] = {
            "prompt_ids": prompt_ids,
            "conversation_ids": conversation_ids,
            "questions": asked,
            "everyday": everyday.answer(module.model, tokenizer, prompt_ids, opts.answer_tokens, seed),
            "conversation": everyday.answer(module.model, tokenizer, conversation_ids, opts.answer_tokens, seed),
        }
        if base is None:
            out["signature"] = everyday.task_signature(
                everyday.task_answers(tokenizer, features), [a["text"] for a in out["everyday"]]
            )
        return out

    def _held_out_prompts(self, trainer: L.Trainer, limit: int) -> list[list[int]]:
        datamodule = getattr(trainer, "datamodule", None)
        features = getattr(datamodule, "eval_features", None) or getattr(datamodule, "train_features", None) or []
        return measure.prompt_prefixes(features, limit)

    def _retain(self, module: Any, base: dict | None, seed: int) -> dict:
        opts = self.opts.forgetting
        tokenizer = module.tokenizer
        rows = read_rows(opts.data or str(GENERAL_RETAIN)).rows[: opts.samples]
        texts = [r["text"] for r in rows if isinstance(r.get("text"), str) and r["text"].strip()]
        out: dict[str, Any] = {"perplexity": measure.perplexity(module, texts) if texts else None}
        if base is None:
            prompts = [r["prompt"] for r in rows if isinstance(r.get("prompt"), (str, list))]
            prompt_ids = [
                list(tokenizer(chat.prompt_text(tokenizer, p), add_special_tokens=False)["input_ids"]) for p in prompts
            ]
            samples = (
                measure.sample(module.model, tokenizer, prompt_ids, opts.max_new_tokens, 1.0, seed)
                if prompt_ids
                else []
            )
            out["prompts"], out["completions"] = prompt_ids, [s for s, _ in samples]
        else:
            out["prompts"], out["completions"] = base["prompts"], base["completions"]
        out["logprobs"] = measure.completion_logprobs(module, out["prompts"], out["completions"])
        return out

    # -- findings --------------------------------------------------------------------------------
    def summarize(self, summary: dict) -> None:
        findings = []
        for guard, build in (
            ("overfit", self._overfit),
            ("repetition", self._repetition),
            ("forgetting", self._forgetting),
            ("rank", lambda: self._rank(summary)),
        ):
            if self.opts.on(guard):
                findings.append(build())
        add_to_summary(summary, findings)
        if self.seconds:
            summary["guards_measure_time_s"] = round(self.seconds, 2)  # inside the train time

    def _overfit(self) -> Finding:
        if self.online:
            return skipped(
                "overfit",
                "an online objective: its loss is a policy gradient, not a likelihood "
                "(the held-out reward before and after is in the summary)",
            )
        if not self.points:
            return skipped("overfit", "no evaluation during training (no eval data, or trainer.eval_every=0)")
        first, best, last = self.points[0], self.best or self.points[0], self.points[-1]
        finding = Finding(
            "overfit",
            detail=f"eval loss {first['eval_loss']:.4g} (step {first['step']}) -> best "
            f"{best['eval_loss']:.4g} (step {best['step']}) -> {last['eval_loss']:.4g} (step {last['step']})",
            data={"points": self.points, "best_step": best["step"]},
        )
        rising = last["step"] > best["step"] and last["eval_loss"] > best["eval_loss"] * (
            1 + self.opts.overfit.tolerance
        )
        gaps = [p["eval_loss"] - p["train_loss"] if p["train_loss"] is not None else None for p in (best, last)]
        if rising and gaps[0] is not None and gaps[1] is not None and gaps[1] > gaps[0]:
            finding.raise_to(
                "warning",
                f"eval loss rose from {best['eval_loss']:.4g} at step {best['step']} to "
                f"{last['eval_loss']:.4g} at step {last['step']} while train loss fell to "
                f"{last['train_loss']:.4g} (gap {gaps[0]:.3g} -> {gaps[1]:.3g}): the model is memorising "
                f"its training rows; train fewer steps (best at step {best['step']}), add data, or set "
                "guards.overfit.early_stopping=true",
            )
        if self.stopped_early_at is not None:
            finding.raise_to(
                "info",
                f"stopped early at step {self.stopped_early_at}: no improvement in "
                f"{self.opts.overfit.patience} evaluations",
            )
        if self.restored_step is not None:
            finding.raise_to("info", f"restored the weights of step {self.restored_step} (best eval loss)")
        return finding

    def _repetition(self) -> Finding:
        base, after = self.base.get("repetition"), self.after.get("repetition")
        if not base or not after:
            return skipped("repetition", self.notes.get("model", "no held-out prompts to sample"))
        margin = self.opts.repetition.margin
        finding = Finding(
            "repetition",
            detail=f"repetition {after['repetition']:.2f} (base {base['repetition']:.2f}), "
            f"no stop {after['no_stop']:.0%} (base {base['no_stop']:.0%}) on {after['samples']} prompts",
            data={
                "base": _public(base),
                "after": _public(after),
                "answers": after.get("answers", []),
                "base_answers": base.get("answers", []),
            },
        )
        if after["repetition"] > base["repetition"] + margin:
            finding.raise_to(
                "warning",
                f"sampled answers repeat themselves more than the base model's "
                f"({after['repetition']:.2f} vs {base['repetition']:.2f} of token 3-grams repeated)",
            )
        if after["no_stop"] > base["no_stop"] + margin:
            finding.raise_to(
                "warning",
                f"{after['no_stop']:.0%} of sampled answers never reach an end-of-turn token "
                f"(base {base['no_stop']:.0%}): check the template guard and that labels train the "
                "end-of-turn token",
            )
        return finding

    def _forgetting(self) -> Finding:
        base, after = self.base.get("forgetting") or {}, self.after.get("forgetting") or {}
        if not (base and after) and not (self.base.get("everyday") and self.after.get("everyday")):
            return skipped("forgetting", self.notes.get("model", "not measured"))
        opts = self.opts.forgetting
        kl = measure.kl_per_token(base["logprobs"], after["logprobs"]) if base.get("logprobs") and after else None
        ppl0, ppl1 = base.get("perplexity"), after.get("perplexity")
        parts = []
        if ppl0 and ppl1:
            parts.append(f"general-text perplexity {ppl0:.4g} -> {ppl1:.4g} ({ppl1 / ppl0 - 1:+.1%})")
        if kl is not None:
            parts.append(f"KL(base||tuned) {kl:.3g} nats/token on {len(base['logprobs'])} base samples")
        behaviour = None
        if self.base.get("everyday") and self.after.get("everyday"):
            behaviour = everyday.compare(
                self.base["everyday"], self.after["everyday"], self.base["everyday"]["signature"]
            )
            parts.insert(
                0,
                f"degenerate answers to everyday prompts {behaviour['tuned_rate']:.0%} (base "
                f"{behaviour['base_rate']:.0%}) of {behaviour['answers']}",
            )
        data: dict[str, Any] = {"perplexity_before": ppl0, "perplexity_after": ppl1, "kl_per_token": kl}
        if behaviour is not None:
            data["everyday"] = {k: v for k, v in behaviour.items() if k != "rows"}
            from lft.output.summary import write_json

            folder = Path(self.config.output) / "guards"  # where base.json is, in a run
            if folder.is_dir():  # every answer, base and tuned side by side, with its signs
                write_json(folder / "everyday.json", behaviour)
        finding = Finding("forgetting", detail=", ".join(parts), data=data)
        fix = "mix general data in (guards.forgetting.mix_ratio=0.1), lower the learning rate or train fewer steps"
        if behaviour is not None and behaviour["tuned_rate"] - behaviour["base_rate"] > opts.max_degenerate_increase:
            signs = ", ".join(
                f"{name} {count}" for name, count in sorted(behaviour["by_signal"].items(), key=lambda kv: -kv[1])
            )
            finding.raise_to(
                "warning",
                f"{behaviour['tuned_rate']:.0%} of the tuned model's answers to everyday "
                f"prompts degenerate (base {behaviour['base_rate']:.0%}; {signs}): it is forgetting how "
                f"to answer outside its task; {fix}",
            )
            for row in behaviour["worst"][:3]:
                finding.examples.append(
                    f"{row['prompt']!r} -> {_clip(row['tuned'])!r} ({', '.join(row['tuned_signals'])}; "
                    f"base: {_clip(row['base'])!r})"
                )
        if ppl0 and ppl1 and ppl1 > ppl0 * (1 + opts.max_ppl_increase):
            finding.raise_to(
                "warning",
                f"perplexity on general text rose {ppl1 / ppl0 - 1:.0%} ({ppl0:.4g} -> "
                f"{ppl1:.4g}): the model is forgetting general language; {fix}",
            )
        if kl is not None and kl > opts.max_kl:
            finding.raise_to(
                "warning",
                f"the tuned model drifted from the base on general prompts (KL {kl:.3g} "
                f"nats/token > {opts.max_kl}); {fix}",
            )
        return finding

    def _rank(self, summary: dict) -> Finding:
        if self.rank is None:
            return skipped("rank", "the model has no low-rank adapter")
        points = [p for p in self.points if p["train_loss"] is not None]
        if len(points) < 3:
            return skipped("rank", f"r={self.rank}; fewer than 3 evaluations to judge a plateau")
        opts = self.opts.rank
        mid, last = points[len(points) // 2], points[-1]
        improvement = (mid["eval_loss"] - last["eval_loss"]) / max(abs(mid["eval_loss"]), 1e-8)
        finding = Finding(
            "rank",
            detail=f"r={self.rank}; eval loss improved {improvement:.1%} over the second half, "
            f"eval {last['eval_loss']:.4g} vs train {last['train_loss']:.4g}",
        )
        wrapper = summary.get("wrapper")
        section = getattr(self.config, wrapper, None) if wrapper else None
        key = f"{wrapper}.r" if section is not None and "r" in type(section).model_fields else "the adapter rank"
        if (
            self.rank <= opts.low
            and 0 <= improvement < opts.plateau
            and last["eval_loss"] > last["train_loss"] * (1 + opts.gap)
        ):
            finding.raise_to(
                "warning",
                f"the eval loss plateaued at {last['eval_loss']:.4g}, well above the train loss "
                f"{last['train_loss']:.4g}, with a rank of {self.rank}: the adapter may be too small for "
                f"this shift; try {key}={self.rank * 2}",
            )
        return finding


def _clip(text: str, width: int = 120) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def _public(stats: dict) -> dict:
    return {k: v for k, v in stats.items() if k in ("repetition", "no_stop", "length", "samples")}

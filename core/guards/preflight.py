"""The guards that look at a run's data before training: template lint, data lint, contamination.

``RunGuards`` is created by the engine for every run (and by ``lft check``, which runs the very
same data path without training). ``preflight`` runs on the rows as read, before formatting, so
that overlapping rows can be dropped and general rows mixed in; ``formatted`` adds what only the
formatting knows (truncation) and stops the run on errors, or on any warning under
``guards.strict``.
"""

from __future__ import annotations

import math
import random
from typing import Any

from rich.markup import escape

from lft.data import chat, task
from lft.data.files import Rows, read_rows
from lft.guards.contamination import check_contamination
from lft.guards.findings import TITLES, Finding, add_to_summary, enforce
from lft.guards.lint import lint_rows
from lft.guards.template import check_template
from lft.objective import Objective

GENERAL_MIX = task.ASSETS / "general-mix.jsonl"
#: The prompts the base model answers for ``guards.forgetting.mix_data=self`` (apart from the
#: everyday prompts the forgetting guard checks, and from the general text it measures).
GENERAL_PROMPTS = task.ASSETS / "general-prompts.jsonl"
SELF = "self"
SELF_SAMPLES = 2  # answers sampled per prompt
ORDER = ("template", "lint", "contamination")


class RunGuards:
    def __init__(self, config: Any, selection: Any, console: Any, objective: Objective, check_only: bool = False):
        self.config = config
        self.objective = objective  # it says how to read a row (row_texts) and whether it learns online
        #: The evaluation interval the guards chose, when the user set none (the config is left as it is).
        self.eval_every: int | None = None
        self.selection = selection
        self.console = console
        self.check_only = check_only
        self.opts = config.section("guards")
        self.findings: list[Finding] = []
        self.generation_config: Any = None  # the model's, when loaded: its eos ids are checked
        self.model: Any = None  # the base model, when loaded: it answers the prompts of mix_data=self
        self.mixed = 0
        self._rows: Rows | None = None

    def preflight(self, tokenizer: Any, train: Rows, eval_rows: Rows | None) -> Rows:
        """Check the rows of a run before they are formatted; returns the training rows to use (with
        overlapping rows dropped and general rows mixed in when asked)."""
        opts = self.opts
        self._rows = train
        if opts.on("template"):
            self.findings.append(
                check_template(
                    tokenizer,
                    train,
                    self.selection.hook,
                    self.config,
                    self.selection.objective,
                    opts.template.rows,
                    self.generation_config,
                    self.objective.row_texts,
                )
            )
        if opts.on("contamination"):
            train = self.contamination(train, eval_rows)
        train = self.mix(train, tokenizer)
        if not self.check_only:
            self.eval_cadence(train, eval_rows)
            enforce(self.findings, strict=False)
        return train

    def formatted(self, stats: Any) -> None:
        """Called once the training rows are formatted, with their ``FormatStats``."""
        if self.opts.on("lint") and self._rows is not None:
            self.findings.append(
                lint_rows(
                    self._rows, self.objective.row_texts, stats.truncated, stats.longest, self.config.data.max_length
                )
            )
        self.findings.sort(key=lambda f: ORDER.index(f.guard) if f.guard in ORDER else len(ORDER))
        if not self.check_only:
            enforce(self.findings, strict=self.opts.strict)
            for finding in self.findings:  # shown now, not only in the summary after training
                for problem in finding.problems if finding.fired else []:
                    self.console.print(
                        f"[yellow]guard warning:[/] {escape(TITLES.get(finding.guard, finding.guard))}: "
                        f"{escape(problem)}"
                    )

    def contamination(self, train: Rows, eval_rows: Rows | None) -> Rows:
        opts = self.opts.contamination
        references = [("the eval data", eval_rows)] if eval_rows is not None and len(eval_rows) else []
        references += [(path, read_rows(path)) for path in opts.against]
        finding, flagged = check_contamination(
            train, references, opts.ngram, opts.overlap, row_texts=self.objective.row_texts
        )
        if flagged and opts.drop:
            train = train.subset([i for i in range(len(train)) if i not in flagged])
            finding.raise_to(
                "info", f"dropped the {len(flagged)} overlapping training rows (guards.contamination.drop)"
            )
            finding.status = "info"  # dealt with: no longer a warning
        self.findings.append(finding)
        return train

    def mix(self, train: Rows, tokenizer: Any = None) -> Rows:
        """Mix general rows into the training rows: ``mix_ratio`` of the result comes from ``mix_data``
        (``self``: the base model's own answers to general prompts)."""
        opts = self.opts.forgetting
        if opts.mix_ratio <= 0:
            return train
        if opts.mix_data == SELF:
            if self.model is None or tokenizer is None:  # lft check loads no model
                return train
            general = self.own_answers(tokenizer)
        else:
            general = read_rows(opts.mix_data or str(GENERAL_MIX))
        count = round(len(train) * opts.mix_ratio / (1 - opts.mix_ratio))
        order = list(range(len(general)))
        random.Random(self.config.trainer.seed).shuffle(order)
        picked = [order[i % len(order)] for i in range(count)]
        self.mixed = count
        self.console.print(
            f"[dim]guards: mixing {count} general rows from {general.source} into {len(train)} training "
            f"rows (guards.forgetting.mix_ratio={opts.mix_ratio})[/]"
        )
        return Rows(
            train.source,
            train.rows + [general.rows[i] for i in picked],
            train.where + [general.where[i] for i in picked],
        )

    def own_answers(self, tokenizer: Any) -> Rows:
        """The base model's answers to lft's general prompts, sampled at temperature 1 (two per
        prompt, seeded), as conversations, keeping only the answers that stop and do not loop;
        cached on disk per model, tokenizer and prompts. Training on samples of the base is
        training toward the base's own distribution outside the task (it lowers KL(base || tuned)
        on them); greedy answers would sharpen the distribution instead."""
        import hashlib
        import json

        from lft.errors import DataError
        from lft.guards import everyday
        from lft.model.loading import cache_dir
        from lft.model.reference import tokenizer_fingerprint
        from lft.output.files import atomic_write_text

        opts = self.opts.forgetting
        prompts = everyday.read_prompts(GENERAL_PROMPTS, 10_000)
        model_cfg = self.config.model
        key = hashlib.sha256(
            json.dumps(
                [
                    str(model_cfg.path),
                    model_cfg.gguf_file,
                    model_cfg.dtype,
                    tokenizer_fingerprint(tokenizer),
                    prompts,
                    opts.answer_tokens,
                    f"sampled at T=1, {SELF_SAMPLES} per prompt",
                    self.config.trainer.seed,
                ]
            ).encode()
        )
        path = cache_dir() / "self-mix" / f"{key.hexdigest()[:20]}.jsonl"
        if not path.is_file():
            self.console.print(
                f"[dim]guards: the base model answers {len(prompts)} general prompts twice for "
                f"guards.forgetting.mix_data=self (once; cached)...[/]"
            )
            asked = [p for p in prompts for _ in range(SELF_SAMPLES)]
            ids = [
                list(tokenizer(chat.prompt_text(tokenizer, p), add_special_tokens=False)["input_ids"]) for p in asked
            ]
            answers = everyday.answer(
                self.model, tokenizer, ids, opts.answer_tokens, self.config.trainer.seed, temperature=1.0
            )
            answered = [
                {"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": a["text"]}]}
                for p, a in zip(asked, answers)
                if a["stopped"] and a["text"] and not everyday.signals(a, [])
            ]
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(
                path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in answered), "self-mix cache"
            )
        rows = read_rows(str(path)) if path.stat().st_size else None
        if rows is None:
            raise DataError(
                f"guards.forgetting.mix_data=self: none of the base model's answers to {GENERAL_PROMPTS} "
                "stopped without looping; give mix_data=FILE with general rows instead"
            )
        return rows

    def eval_cadence(self, train: Rows, eval_rows: Rows | None) -> None:
        """Evaluate during training when the user did not choose an interval, so the overfitting guard
        has a curve to watch."""
        tc = self.config.trainer
        if not self.opts.on("overfit") or not eval_rows or tc.eval_every or "eval_every" in tc.model_fields_set:
            return
        if self.objective.online:
            return  # a policy-gradient loss says nothing about memorising; each evaluation is a rollout
        steps = (
            tc.max_steps if tc.max_steps > 0 else tc.epochs * math.ceil(len(train) / (tc.batch_size * tc.grad_accum))
        )
        self.eval_every = max(1, steps // self.opts.overfit.eval_points)
        self.console.print(
            f"[dim]guards: eval loss every {self.eval_every} steps to watch for overfitting "
            "(set trainer.eval_every to choose)[/]"
        )

    def finish(self, summary: dict) -> None:
        add_to_summary(summary, self.findings)
        if self.mixed:
            summary.setdefault("data", {})["mixed_general_rows"] = self.mixed

"""GKD: on-policy distillation from a teacher model (Agarwal et al. 2024, arXiv 2306.13649). The
student samples completions of the data's prompts and is trained, token by token, towards the
teacher's next-token distribution there (``lft.losses.gkd``: a generalised Jensen-Shannon
divergence, or either KL). No reward is needed; any selected reward plugin is logged.

``gkd.teacher`` is any model lft can load: a model folder, a ``.gguf`` file, or an lft adapter
folder (its base and adapter). Teacher and student must share a tokenizer. The offline form of
distillation, SFT on the teacher's sampled and filtered answers, is ``lft distill``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
from pydantic import Field

import lft
from lft.losses.gkd import gkd_loss
from lft.model.forward import completion_stats, eval_mode, split_head
from lft.online.rewards import reward_plugins
from lft.online.rollout import experience
from lft.plugins.online import EMBEDDED_ROLLOUT, OnlineMethod
from lft.plugins.online_update import OnlineOptions, RolloutObjective


class GKDOptions(OnlineOptions):
    teacher: str | None = Field(
        None, description="The teacher: a model folder, a .gguf file or an lft adapter folder (required)."
    )
    beta: float = Field(
        0.5,
        ge=0,
        le=1,
        description="0: forward KL(teacher || student); 1: reverse KL(student || teacher); between: the "
        "generalised Jensen-Shannon divergence JSD(beta).",
    )
    temperature: float = Field(0.9, gt=0, description="Sampling temperature, also applied to both distributions.")


def same_tokenizer(student: Any, teacher: Any) -> bool:
    return student.get_vocab() == teacher.get_vocab() and student.eos_token_id == teacher.eos_token_id


def load_teacher(path: str, student_tokenizer: Any) -> Any:
    """The teacher model, frozen; a one-line error when it cannot be loaded or its tokenizer differs."""
    folder = Path(path).expanduser()
    if not folder.exists():
        raise lft.ConfigError(f"gkd.teacher={path}: no such file or folder")
    try:
        loaded = lft.load(adapters=str(folder)) if (folder / "adapter_config.json").is_file() else lft.load(str(folder))
    except lft.LftError:
        raise
    except Exception as exc:
        raise lft.ConfigError(f"gkd.teacher={path} could not be loaded: {type(exc).__name__}: {exc}") from None
    if not same_tokenizer(student_tokenizer, loaded.tokenizer):
        raise lft.ConfigError(
            f"gkd.teacher={path} has another tokenizer than the student; GKD compares their next-token "
            "distributions token by token, so both must share one (use a teacher of the student's family)"
        )
    return loaded.model


def completion_logits(model: Any, exp: Mapping[str, Any], rows: Any, chunk: int) -> torch.Tensor:
    """The model's logits at the positions that predict each completion token, (n, C, V)."""
    ids, mask, pos = exp["input_ids"][rows], exp["attention_mask"][rows], exp["position_ids"][rows]
    start = exp["prompt_length"]
    parts = split_head(model)
    if parts is None:
        return model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, start - 1 : -1]
    stats = completion_stats(
        model, ids, mask, exp["labels"][rows], start, chunk, hidden=True, position_ids=pos,
        groups=exp["prompt_index"][rows] if "prompt_index" in exp else None,
    )  # fmt: skip
    return parts[1](stats["hidden"])


class GKDObjective(RolloutObjective):
    """The student's divergence to the teacher on its own samples, a mean over completion tokens."""

    opts: GKDOptions
    progress_metrics = ("divergence", "reward")
    summary_metrics = ("divergence",)
    runs_padding_free = False
    reward_metric = None

    def __init__(self, opts: GKDOptions, config: Any):
        super().__init__("gkd", opts, config)
        self.teacher: Any = None

    def setup(self, module: Any) -> None:
        if not self.opts.teacher:
            raise lft.ConfigError(
                "gkd needs a teacher: set gkd.teacher=PATH (a model folder, a .gguf file or an lft adapter folder, "
                "e.g. the final/ folder of an earlier lft run)"
            )
        self.teacher = load_teacher(self.opts.teacher, module.tokenizer).to(module.device)
        self.has_rewards = bool(reward_plugins(module.hook))

    def divergence(self, module: Any, exp: dict, rows: Any) -> torch.Tensor:
        chunk = self.config.trainer.logits_chunk
        with torch.no_grad(), eval_mode(self.teacher):
            teacher = completion_logits(self.teacher, exp, rows, chunk)
        student = completion_logits(module.model, exp, rows, chunk)
        width = min(student.shape[-1], teacher.shape[-1], len(module.tokenizer))  # padded embedding rows
        mask = exp["completion_mask"][rows]
        return gkd_loss(student[..., :width], teacher[..., :width], mask, self.opts.beta, self.opts.temperature)

    def loss(self, module: Any, exp: dict, rows: Any) -> tuple[Any, dict]:
        value = self.divergence(module, exp, rows)
        return value, {"divergence": value.detach()}

    def __call__(self, module: Any, batch: Mapping[str, Any]) -> tuple[torch.Tensor, dict]:
        """Held out: the divergence on the student's greedy answers, and any reward."""
        exp = experience(module, batch, self.eval_rollout)
        with torch.no_grad():
            value = self.divergence(module, exp, torch.arange(exp["completion_ids"].shape[0]))
        metrics = {"divergence": value, "completion_length": exp["completion_mask"].sum(-1).float().mean()}
        if self.has_rewards:
            metrics["reward"] = exp["rewards"].mean()
            metrics.update({f"reward_{k}": v.mean() for k, v in exp["reward_scores"].items()})
        return value, metrics


class GKD(OnlineMethod):
    """Objective: on-policy distillation towards a teacher's token distributions."""

    name = "gkd"
    options = GKDOptions
    objective_class = GKDObjective
    default_settings = {**EMBEDDED_ROLLOUT, "trainer.max_steps": 40}

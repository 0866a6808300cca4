"""Runs for the batch-shape invariants (tests/core/test_invariance.py) and the reference trajectory
(tests/core/test_trajectory.py): one objective, one batch shape, a few optimizer steps in fp32 on a
pinned tiny model, with the first step's gradients, the weights and each step's loss and
gradient norm written to a file.

Run as a script it trains several cases in one process, which is how the 2-process DDP cases
run: Lightning starts rank 1 by running this file again with the same arguments.

    python tests/invariance.py CASES_JSON OUTPUT_FOLDER [STEPS]
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch

import lft
import lft.plugins.sft

#: Eight rows whose completions run from 2 to 80 words: a micro-batch mean would weigh them wrongly.
LENGTHS = [2, 80, 5, 40, 3, 60, 10, 25]
WORDS = (
    "the cat sat on a mat and then it ran to see what was new in the big wide world of sums "
    "seven plus eight is fifteen so the answer is"
).split()

#: ``name: (plugins, data form, settings)``; the online cases train on fixed experience.
CASES: dict[str, tuple[list[str], str, dict]] = {
    "sft": (["sft"], "sft", {}),
    "dpo": (["dpo"], "pref", {"dpo.nll_weight": 0.5}),
    "orpo": (["orpo"], "pref", {"orpo.odds_ratio_weight": 0.5}),
    "simpo": (["simpo"], "pref", {"simpo.nll_weight": 0.5}),
    "reward": (["reward"], "pref", {"reward.center_coefficient": 0.01}),
    "grpo": (["grpo"], "prompts", {"grpo.num_generations": 2, "grpo.beta": 0.05}),
    "grpo_dapo": (["grpo"], "prompts", {"grpo.num_generations": 2, "grpo.loss": "dapo"}),
    "grpo_dr": (["grpo"], "prompts", {"grpo.num_generations": 2, "grpo.loss": "dr_grpo"}),
    "ppo": (["ppo"], "prompts", {"ppo.epochs": 1, "ppo.minibatches": 1, "ppo.whiten_advantages": False}),
    "third_party": ([], "sft", {}),
}
#: ``shape: (batch size, gradient accumulation, processes, attention)``; 8 rows per optimizer step.
SHAPES = {
    "one": (8, 1, 1, "sdpa"),
    "accum": (2, 4, 1, "sdpa"),
    "ddp": (4, 1, 2, "sdpa"),
    "eager": (8, 1, 1, "eager"),
    "trajectory": (4, 2, 1, "sdpa"),
}
ONLINE_MICRO = 4  # an online case's "accum" shape: batch 8, its update in 4 micro-batches


def is_online(case: str) -> bool:
    return CASES[case][1] == "prompts"


def write_data(directory: Path) -> dict[str, Path]:
    """SFT rows, preference pairs and prompts with very different lengths (seeded)."""
    rng = random.Random(0)
    sft, pref, prompts = [], [], []
    for i, n in enumerate(LENGTHS):
        text = " ".join(rng.choice(WORDS) for _ in range(n))
        other = " ".join(rng.choice(WORDS) for _ in range(1 + (n * 7) % 50))
        sft.append({"prompt": f"Say {i} things.", "completion": text})
        pref.append({"prompt": f"Say {i} things.", "chosen": text, "rejected": other})
        prompts.append({"prompt": " ".join(rng.choice(WORDS) for _ in range(1 + n // 4)), "answer": str(i)})
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for form, rows in (("sft", sft), ("pref", pref), ("prompts", prompts)):
        paths[form] = directory / f"{form}.jsonl"
        paths[form].write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return paths


def write_pinned_model(directory: Path) -> Path:
    """The tiny test model with every weight drawn from one seeded generator in parameter order,
    so its values do not depend on how transformers initialises a model."""
    from lft.plugin.testing import build_model, build_tokenizer

    tokenizer = build_tokenizer()
    model = build_model(tokenizer)
    generator = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def fixed_completions(
    model: Any, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, settings: Any, stop_ids: list[int], pad_id: int
) -> torch.Tensor:
    """Stands in for sampling: each prompt's completions follow from its own tokens alone, with
    lengths from 1 to 6, so every batch shape trains on the same experience."""
    group, width = settings.num_generations, settings.max_new_tokens
    out = torch.full((prompt_ids.shape[0] * group, width), pad_id, dtype=prompt_ids.dtype, device=prompt_ids.device)
    for row in range(prompt_ids.shape[0]):
        real = prompt_ids[row][prompt_mask[row].bool()].tolist()
        seed = sum(real)
        for sample in range(group):
            length = min(width, 1 + (seed + 3 * sample) % 6)
            tokens = [3 + (seed * 7 + 13 * sample + 5 * t) % 300 for t in range(length)]
            out[row * group + sample, :length] = torch.tensor(tokens)
            if length < width and (seed + sample) % 2:
                out[row * group + sample, length] = stop_ids[0]
    return out


class LengthReward:
    """A reward that follows from the completion's text alone: its length modulo 5, scaled."""

    name = "test-length-reward"
    kind = "extension"

    @lft.hookimpl
    def lft_reward(self, prompts: list, completions: list, batch: dict, config: Any) -> Any:
        return {"name": "length", "scores": [(len(c) % 5) / 4 for c in completions], "weight": 1.0}


class SequenceNLL(lft.plugins.sft.SFT):
    """A third-party objective: the mean over sequences of each sequence's mean token NLL,
    declared through the objective contract as an average over sequences."""

    name = "test-sequence-nll"

    def objective(self, config: Any) -> Any:
        from lft.model.forward import token_logprobs
        from lft.objective import Objective

        class PerSequenceNLL(Objective):
            def units(self, batch: dict) -> dict:
                return {"sequences": batch["input_ids"].shape[0]}

            def __call__(self, module: Any, batch: dict) -> tuple[Any, dict]:
                logps, mask = token_logprobs(module.model, batch["input_ids"], batch["attention_mask"], batch["labels"])
                per_sequence = -(logps * mask).sum(-1) / mask.sum(-1).clamp(min=1)
                return per_sequence.mean(), {}

        return PerSequenceNLL()


class Probe:
    """Records the first step's gradients and the weights before and after training."""

    name = "test-invariance-probe"
    kind = "extension"

    def __init__(self, path: Path):
        self.path = path

    @lft.hookimpl
    def lft_callbacks(self, config: Any) -> Any:
        path = self.path

        class Recorder(L.Callback):
            def __init__(self) -> None:
                self.record: dict[str, Any] = {"grads": None}

            def trainable(self, module: Any) -> dict:
                return {n: p for n, p in module.named_parameters() if p.requires_grad}

            def on_train_start(self, trainer: Any, module: Any) -> None:
                self.record["init"] = {n: p.detach().clone() for n, p in self.trainable(module).items()}

            def on_before_optimizer_step(self, trainer: Any, module: Any, optimizer: Any) -> None:
                if self.record["grads"] is None:
                    self.record["grads"] = {
                        n: p.grad.detach().clone() for n, p in self.trainable(module).items() if p.grad is not None
                    }

            def on_train_end(self, trainer: Any, module: Any) -> None:
                if trainer.global_rank == 0:
                    self.record["weights"] = {n: p.detach().clone() for n, p in self.trainable(module).items()}
                    torch.save(self.record, path)

        return [Recorder()]


def config(
    case: str, shape: str, wrapper: str, model: Path, data: dict[str, Path], output: Path, steps: int = 1
) -> dict:
    plugins, form, settings = CASES[case]
    batch, accum, devices, attention = SHAPES[shape]
    if is_online(case) and shape in ("accum", "trajectory"):
        batch, accum = 8, ONLINE_MICRO if shape == "accum" else 2
    cfg = {
        "model.path": str(model),
        "model.attn_implementation": attention,
        "data.train": str(data[form]),
        "data.eval_split": 0,
        "output": str(output),
        "overwrite": True,
        "plugins": [*plugins, wrapper],
        "trainer.max_steps": steps,
        "trainer.lr": 1e-3,
        "trainer.batch_size": batch,
        "trainer.grad_accum": accum,
        "trainer.devices": devices,
        "trainer.strategy": "ddp" if devices > 1 else "auto",
        "trainer.accelerator": "cpu",
        "trainer.precision": "32-true",
        "trainer.checkpoint_every": 0,
        "trainer.max_grad_norm": None,
        "trainer.warmup_steps": 0,
        "trainer.schedule": "constant",
        "trainer.seed": 7,
        "eval.task": "none",
        "eval.before": False,
        "guards.repetition.enabled": False,
        "guards.forgetting.enabled": False,
        "guards.overfit.enabled": False,
        "guards.rank.enabled": False,
        "guards.template.enabled": False,
        "guards.lint.enabled": False,
        "guards.contamination.enabled": False,
    }
    if wrapper == "lora":
        cfg["lora.dropout"] = 0.0
    if shape == "trajectory":  # 20 steps: clipped, as users train, and gentler on fixed experience
        cfg["trainer.max_grad_norm"] = 1.0
        cfg["trainer.lr"] = 1e-4 if is_online(case) else 1e-3
    if is_online(case):
        section = plugins[0]
        cfg.update({f"{section}.max_new_tokens": 6, f"{section}.samples_to_log": 0, "data.max_eval_rows": 2})
    cfg.update(settings)
    return cfg


def train(
    case: str, shape: str, wrapper: str, model: Path, data: dict[str, Path], output: Path, steps: int = 1
) -> dict:
    """Train one case and return what the probe recorded (rank 0), plus the per-step losses."""
    import lft.online.rollout

    record_path = output.with_suffix(".pt")
    original = lft.online.rollout.generate_tokens
    lft.online.rollout.generate_tokens = fixed_completions
    try:
        extra: list[Any] = [Probe(record_path)]
        extra += [LengthReward()] if is_online(case) else []
        extra += [SequenceNLL()] if case == "third_party" else []
        result = lft.run(config(case, shape, wrapper, model, data, output, steps), plugins=extra, quiet=True)
    finally:
        lft.online.rollout.generate_tokens = original
    if result.metrics.get("rank", 0) != 0:
        return {}
    record = torch.load(record_path)
    record["losses"] = [h["loss"] for h in result.history]
    record["grad_norms"] = [h["grad_norm"] for h in result.history]  # before clipping
    return record


#: The reference trajectory: these cases, 20 optimizer steps each, 4 x 2 accumulated micro-batches.
TRAJECTORY = {
    "sft": "full",
    "sft_lora": "lora",
    "dpo": "full",
    "orpo": "full",
    "simpo": "full",
    "reward": "full",
    "grpo": "full",
    "ppo": "full",
}
TRAJECTORY_STEPS = 20
TRAJECTORY_FILE = Path(__file__).parent / "reference_trajectory.json"


def trajectory(root: Path) -> dict[str, dict[str, list[float]]]:
    """Per-step losses and gradient norms of each ``TRAJECTORY`` case on the pinned model."""
    model = root / "model"
    if not model.exists():
        write_pinned_model(model)
    data = write_data(root / "data")
    out = {}
    for name, wrapper in TRAJECTORY.items():
        case = name.removesuffix("_lora")
        record = train(case, "trajectory", wrapper, model, data, root / f"trajectory-{name}", steps=TRAJECTORY_STEPS)
        out[name] = {
            "loss": [round(x, 7) for x in record["losses"]],
            "grad_norm": [round(x, 7) for x in record["grad_norms"]],
        }
    return out


if __name__ == "__main__" and sys.argv[1:2] == ["--write-trajectory"]:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        found = trajectory(Path(tmp))
    lines = [
        f'  "{name}": {{\n    "loss": {json.dumps(v["loss"])},\n    "grad_norm": {json.dumps(v["grad_norm"])}\n  }}'
        for name, v in found.items()
    ]
    TRAJECTORY_FILE.write_text("{\n" + ",\n".join(lines) + "\n}\n", encoding="utf-8")
    print(f"wrote {TRAJECTORY_FILE}")
elif __name__ == "__main__":  # one process per DDP rank runs this
    cases, out = json.loads(sys.argv[1]), Path(sys.argv[2])
    steps = int(sys.argv[3]) if len(sys.argv) > 3 else 1
    model, data = out / "model", write_data(out / "data")
    for case, shape, wrapper in cases:
        record = train(case, shape, wrapper, model, data, out / f"{case}-{shape}-{wrapper}", steps=steps)
        if record:
            torch.save(record, out / f"{case}-{shape}-{wrapper}.record")

"""One benchmark side in its own process: ``python -m lft.bench.workers TOOL SETTINGS.json OUT.json``.

Each worker trains ``steps`` optimizer steps and records, per step, the wall time, the non-pad
tokens processed and the loss, then its peak resident memory. The orchestrator (``lft.bench``)
turns that into medians, throughput and ratios.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

from lft.bench.common import Settings


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- lft ------------------------------------------------------------------------------------------


def lft_config(s: Settings) -> dict:
    config: dict[str, Any] = {
        "model.path": s.model,
        "data.train": s.data,
        "data.eval_split": 0,
        "data.max_length": s.max_length,
        "plugins": [s.method, "lora"],
        "output": str(Path(s.work) / f"lft-{s.method}"),
        "overwrite": True,
        "trainer.max_steps": s.steps,
        "trainer.batch_size": s.batch_size,
        "trainer.lr": s.lr,
        "trainer.schedule": "constant",
        "trainer.warmup_steps": 0,
        "trainer.precision": s.precision,
        "trainer.seed": s.seed,
        "trainer.checkpoint_every": 0,
        "eval.task": "none",
        "eval.before": False,
        "lora.r": s.lora_r,
        "lora.alpha": s.lora_alpha,
        "lora.target_modules": s.targets,
        # The after-training guards sample and score the model, which the peer does not do.
        "guards.repetition.enabled": False,
        "guards.forgetting.enabled": False,
    }
    method_keys = {
        "dpo": {"dpo.beta": s.beta},
        "simpo": {"simpo.beta": 2.0, "simpo.gamma": 1.0},
        "orpo": {},
        "grpo": {
            "grpo.num_generations": s.num_generations,
            "grpo.max_new_tokens": s.max_new_tokens,
            "grpo.temperature": 1.0,
        },
        "ppo": {"ppo.max_new_tokens": s.max_new_tokens},
    }
    config.update(method_keys.get(s.method, {}))
    if s.packed:
        config["data.packing" if s.method == "sft" else "data.padding_free"] = True
    if s.method in ("grpo", "ppo"):  # the peer's reward function is the same exact-answer check
        config["plugins"] = [s.method, "lora", "exact_answer"]
        config["trainer.eval_every"] = 0
        # The peer's batch counts completions, lft's counts prompts: the same completions per step.
        config["trainer.batch_size"] = max(1, s.batch_size // s.num_generations)
        if s.vllm:
            config["plugins"].append("vllm")
    config.update(s.lft_overrides)
    return config


def run_lft(s: Settings) -> dict:
    import lft

    result = lft.run(lft_config(s), quiet=True)
    steps = []
    for h in result.history:
        step = {"time": h["step_time"], "tokens": h["tokens"], "loss": h.get("loss")}
        if "generation_s" in h:  # online methods: the rollout's share of the step
            step.update(generation_s=h["generation_s"], generated_tokens=h["generated_tokens"])
        steps.append(step)
    return {"steps": steps}


# -- the peer -------------------------------------------------------------------------------------


def _trl_common(s: Settings) -> dict:
    import torch

    return dict(
        output_dir=str(Path(s.work) / f"peer-{s.method}"),
        per_device_train_batch_size=s.batch_size,
        gradient_accumulation_steps=1,
        learning_rate=s.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_steps=s.steps,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=s.seed,
        use_cpu=not torch.cuda.is_available(),
        bf16=s.precision.startswith("bf16"),
        dataloader_num_workers=0,
        disable_tqdm=True,
    )


class _Counter:
    """Wraps a data collator and counts the non-pad tokens of every batch it makes."""

    def __init__(self, collator: Any):
        self.collator = collator
        self.pending = 0

    def __call__(self, features: list) -> Any:
        batch = self.collator(features)
        if isinstance(batch, dict):  # GRPO's batches are raw rows, tokenized later: compare steps/s there
            # the sequences the model reads (a separate prompt mask repeats tokens already counted)
            masks = [v for k, v in batch.items() if k.endswith("attention_mask") and not k.startswith("prompt")]
            # a padding-free batch has no mask: every token of its one row is real
            self.pending += int(sum(v.sum() for v in masks)) if masks else int(batch["input_ids"].numel())
        return batch


def run_trl(s: Settings) -> dict:
    import datasets
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    builder = {".parquet": "parquet", ".csv": "csv"}.get(Path(s.data).suffix.lower(), "json")
    data = datasets.load_dataset(builder, data_files=s.data, split="train")
    tokenizer = AutoTokenizer.from_pretrained(s.model)
    model = AutoModelForCausalLM.from_pretrained(s.model)
    lora = LoraConfig(
        r=s.lora_r, lora_alpha=s.lora_alpha, lora_dropout=0.0, target_modules=s.targets, task_type="CAUSAL_LM"
    )
    common = _trl_common(s)
    if s.method == "sft":
        from trl import SFTConfig, SFTTrainer

        packed = {"packing": True, "padding_free": True} if s.packed else {"packing": False}
        args = SFTConfig(**common, max_length=s.max_length, **packed)
        trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer, peft_config=lora)
    elif s.method == "dpo":
        from trl import DPOConfig, DPOTrainer

        args = DPOConfig(**common, beta=s.beta, max_length=s.max_length, padding_free=s.packed)
        trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer, peft_config=lora)
    elif s.method in ("orpo", "simpo"):
        if s.method == "orpo":
            from trl.experimental.orpo import ORPOConfig as Config
            from trl.experimental.orpo import ORPOTrainer as Trainer

            extra: dict = {}
        else:
            from trl.experimental.cpo import CPOConfig as Config
            from trl.experimental.cpo import CPOTrainer as Trainer

            # lft's SimPO defaults (beta 2.0, gamma 1.0, no NLL term)
            extra = {"loss_type": "simpo", "cpo_alpha": 0.0, "beta": 2.0, "simpo_gamma": 1.0}
        args = Config(**common, max_length=s.max_length, **extra)
        trainer = Trainer(model=model, args=args, train_dataset=data, processing_class=tokenizer, peft_config=lora)
    elif s.method == "grpo":
        from trl import GRPOConfig, GRPOTrainer

        from lft.data import task

        def exact_answer(completions: list, answer: list, **_: Any) -> list[float]:
            texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
            return [task.score(t, a) for t, a in zip(texts, answer)]

        on_vllm: dict = {}
        if s.vllm:
            on_vllm = {"use_vllm": True, "vllm_mode": "colocate", "vllm_gpu_memory_utilization": 0.2}
        args = GRPOConfig(
            **common,
            num_generations=s.num_generations,
            max_completion_length=s.max_new_tokens,
            steps_per_generation=1,
            beta=0.0,
            temperature=1.0,
            **on_vllm,
        )
        trainer = GRPOTrainer(
            model=model,
            args=args,
            train_dataset=data,
            processing_class=tokenizer,
            reward_funcs=exact_answer,
            peft_config=lora,
        )
    else:
        raise SystemExit(f"the peer has no {s.method}")

    counter = _Counter(trainer.data_collator)
    trainer.data_collator = counter
    steps: list[dict] = []
    rollout = {"generation_s": 0.0, "generated_tokens": 0}
    if s.method == "grpo":  # time the peer's generation (its own profiling reports to trackers only)
        generate = trainer._generate

        def timed(prompts: list) -> Any:
            started = time.perf_counter()
            out = generate(prompts)
            rollout["generation_s"] += time.perf_counter() - started
            rollout["generated_tokens"] += sum(len(ids) for ids in out[1])  # the completions' token ids
            return out

        trainer._generate = timed

    class Timer(TrainerCallback):
        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.started = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            steps.append({"time": time.perf_counter() - self.started, "tokens": counter.pending})
            if s.method == "grpo":
                steps[-1].update(rollout)
                rollout.update(generation_s=0.0, generated_tokens=0)
            counter.pending = 0

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
            if logs and "loss" in logs and steps:
                steps[-1]["loss"] = float(logs["loss"])

    trainer.add_callback(Timer())
    trainer.train()
    return {"steps": steps}


def main() -> None:
    tool, settings_path, out_path = sys.argv[1:4]
    settings = Settings.load(Path(settings_path))
    if settings.threads:
        import torch

        torch.set_num_threads(settings.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    started = time.perf_counter()
    result = run_lft(settings) if tool == "lft" else run_trl(settings)
    result.update(tool=tool, method=settings.method, peak_rss_mb=peak_rss_mb(), wall_s=time.perf_counter() - started)
    Path(out_path).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

"""Scale through Lightning: the strategy mapping, which process writes, and a real 2-process DDP
run on CPU over gloo that matches a 1-process run with the same global batch."""

import json
import subprocess
import sys
import textwrap

import pytest

import lft
from lft.errors import ConfigError
from lft.plugin.testing import FAST
from lft.train import distributed

DDP_SCRIPT = textwrap.dedent('''
    import json, os, sys
    import torch
    import lft

    class RolloutProbe:
        """Generates from the policy inside every training step, as GRPO and PPO do."""

        name = "rollout-probe"

        def __init__(self):
            self.calls = 0

        @lft.hookimpl
        def lft_rollout(self, module, batch, config):
            prompt = batch["input_ids"][:, :8]
            with torch.no_grad():
                out = module.model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=True,
                                            max_new_tokens=4, pad_token_id=module.tokenizer.pad_token_id)
            assert out.shape[1] > prompt.shape[1]
            self.calls += 1
            return None  # train on the batch as it is, so the loss can be compared

    if __name__ == "__main__":  # Lightning starts rank 1 by running this script again
        config, marker = json.loads(sys.argv[1]), sys.argv[2]
        probe = RolloutProbe()
        result = lft.run(config, plugins=[probe], quiet=True)
        with open(f"{marker}-{os.environ.get('LOCAL_RANK', '0')}", "w") as handle:
            json.dump({"calls": probe.calls, "rank": result.metrics.get("rank", 0)}, handle)
''')


def base_config(model, data, output, **extra):
    config = {
        "model.path": str(model),
        "data.train": str(data["train"]),
        "data.eval": str(data["eval"]),
        "output": str(output),
        "plugins": ["lora"],
        "trainer.max_steps": 6,
        "trainer.lr": 5e-3,
        "trainer.accelerator": "cpu",
        "trainer.checkpoint_every": 3,
    }
    for item in FAST:
        key, value = item.split("=")
        config.setdefault(key, {"true": True, "false": False, "none": None}.get(value, value))
    config.update(extra)
    return config


@pytest.mark.slow
def test_two_process_ddp_on_cpu_matches_one_process(tmp_path, lft_tiny_model, lft_sft_data):
    ddp_out, script = tmp_path / "ddp", tmp_path / "train_ddp.py"
    script.write_text(DDP_SCRIPT)
    config = base_config(
        lft_tiny_model,
        lft_sft_data,
        ddp_out,
        **{
            "trainer.devices": 2,
            "trainer.strategy": "ddp",
            "trainer.batch_size": 2,
            "trainer.loggers": ["csv", "tensorboard"],
        },
    )
    proc = subprocess.run(
        [sys.executable, str(script), json.dumps(config), str(tmp_path / "probe")],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = lft.run(
        base_config(
            lft_tiny_model, lft_sft_data, tmp_path / "single", **{"trainer.devices": 1, "trainer.batch_size": 4}
        ),
        quiet=True,
    )

    ddp_summary = json.loads((ddp_out / "summary.json").read_text())
    assert ddp_summary["processes"] == 2 and single.metrics["processes"] == 1
    records = [json.loads(line) for line in (ddp_out / "metrics.jsonl").read_text().splitlines()]
    ddp_losses = [r for r in records if "loss" in r]  # the rest are the guards' eval records
    assert [r["step"] for r in ddp_losses] == [1, 2, 3, 4, 5, 6]  # one line per step: only rank 0 writes
    # same global batch (2 x 2 vs 1 x 4): every trained token weighs the same across the processes,
    # so the two runs are the same run (tests/core/test_invariance.py compares their gradients)
    assert [r["loss"] for r in ddp_losses] == pytest.approx([h["loss"] for h in single.history], rel=1e-5)
    assert ddp_summary["after"]["eval_loss"] == pytest.approx(single.metrics["after"]["eval_loss"], rel=1e-5)
    assert ddp_summary["after"]["eval_loss"] < 0.98 * ddp_losses[0]["loss"]
    assert [p.name for p in (ddp_out / "logs").iterdir()] == ["version_0"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = list((ddp_out / "tensorboard").rglob("events.out.tfevents.*"))
    assert len({f.name.split(".")[4] for f in files}) == 1  # one process wrote them (the pid is in the name)
    events = EventAccumulator(str(files[0].parent))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3, 4, 5, 6]
    assert (ddp_out / "final" / "adapter_model.safetensors").is_file()
    probes = [json.loads((tmp_path / f"probe-{rank}").read_text()) for rank in (0, 1)]
    assert probes == [{"calls": 6, "rank": 0}, {"calls": 6, "rank": 1}]  # generation ran in both processes


def test_main_process_is_read_from_the_launcher_environment(monkeypatch):
    for key in ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_NTASKS", "SLURM_PROCID"):
        monkeypatch.delenv(key, raising=False)
    assert distributed.is_main_process()
    for env, main in [
        ({"RANK": "0", "LOCAL_RANK": "0"}, True),
        ({"RANK": "3"}, False),
        ({"LOCAL_RANK": "1"}, False),
        ({"NODE_RANK": "1"}, False),
        ({"SLURM_NTASKS": "4", "SLURM_PROCID": "2"}, False),
        ({"SLURM_NTASKS": "1", "SLURM_PROCID": "5"}, True),
    ]:
        with monkeypatch.context() as patch:
            for key, value in env.items():
                patch.setenv(key, value)
            assert distributed.is_main_process() is main, env


def trainer_config(**values):
    return lft.load_config(overrides=[f"trainer.{k}={v}" for k, v in values.items()]).trainer


def test_strategy_mapping_on_cpu():
    from lightning.pytorch.strategies import DDPStrategy

    ddp = distributed.strategy(trainer_config(strategy="ddp", accelerator="cpu"))
    assert isinstance(ddp, DDPStrategy) and ddp._process_group_backend == "gloo"
    with pytest.raises(ConfigError, match="trainer.strategy=model_parallel is not supported"):
        distributed.validate(trainer_config(strategy="model_parallel", accelerator="cpu"))
    assert distributed.strategy(trainer_config(strategy="ddp_spawn")) == "ddp_spawn"  # other names: Lightning's
    with pytest.raises(ConfigError, match="trainer.strategy=fsdp needs CUDA GPUs in Lightning; on CPU use"):
        distributed.validate(trainer_config(strategy="fsdp", accelerator="cpu"))


def test_gpu_strategies_map_at_config_level(monkeypatch, lft_tiny_model):
    """No GPU here: FSDP and DeepSpeed are checked up to the strategy object Lightning receives."""
    import importlib.util

    import torch
    from lightning.pytorch.strategies import FSDPStrategy
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    fsdp_config = trainer_config(strategy="fsdp", accelerator="gpu", devices=4, precision="bf16-mixed")
    distributed.validate(fsdp_config)
    fsdp = distributed.strategy(fsdp_config)
    assert isinstance(fsdp, FSDPStrategy) and fsdp.kwargs["use_orig_params"] is True
    assert fsdp._state_dict_type == "full"
    policy = fsdp.kwargs["auto_wrap_policy"]
    model = AutoModelForCausalLM.from_pretrained(lft_tiny_model)
    assert policy(model, recurse=True)
    wrapped = {type(m).__name__ for m in model.modules() if policy(m, recurse=False)}
    assert wrapped == {"LlamaDecoderLayer"}

    real_find_spec = importlib.util.find_spec
    with pytest.raises(ConfigError, match="needs the deepspeed package: pip install deepspeed"):
        monkeypatch.setattr(
            importlib.util, "find_spec", lambda name: None if name == "deepspeed" else real_find_spec(name)
        )
        distributed.validate(trainer_config(strategy="deepspeed_stage_2", accelerator="gpu"))
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: object() if name == "deepspeed" else real_find_spec(name)
    )
    distributed.validate(trainer_config(strategy="deepspeed_stage_2", accelerator="gpu"))
    assert distributed.strategy(trainer_config(strategy="deepspeed_stage_2")) == "deepspeed_stage_2"


def test_sharded_final_save_reads_the_gathered_weights(lft_tiny_model):
    """Under FSDP/DeepSpeed the final model is saved from weights the strategy gathers on rank 0."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(lft_tiny_model)
    gathered = {f"model.{k}": torch.zeros_like(v) for k, v in model.state_dict().items()}

    class FSDPStrategy:  # the name is what full_weights looks at
        def lightning_module_state_dict(self):
            return gathered

    class Trainer:
        strategy = FSDPStrategy()

    with distributed.full_weights(Trainer(), model):
        inside = model.state_dict()
    assert inside.keys() == model.state_dict().keys() and all(not v.any() for v in inside.values())
    assert any(v.any() for v in model.state_dict().values())  # the model's own method is back

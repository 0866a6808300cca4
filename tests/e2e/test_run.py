"""End to end: `lft run` on a tiny random model, through the real CLI and the Python API."""

import json
import os
import signal

import pytest
import torch

import lft
from lft.cli.main import main
from lft.plugin.testing import FAST


def history(output):
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


def assert_loss_goes_down(output, steps):
    losses = [h["loss"] for h in history(output)]
    assert len(losses) == steps
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.7 * first, f"loss did not go down: {losses}"


def test_sft_lora_cli_trains_and_saves_a_peft_adapter(lft_run, lft_tiny_model):
    summary = lft_run("--plugin", "lora", "trainer.max_steps=30", "trainer.lr=1e-2", "lora.r=8", "eval.before=true")
    out = summary["output"]
    assert summary["objective"] == "sft" and summary["wrapper"] == "lora"
    assert summary["defaults_used"] == ["objective sft"]
    assert_loss_goes_down(out, 30)
    assert summary["after"]["eval_loss"] < summary["before"]["eval_loss"]
    final = out / "final"
    assert (final / "adapter_config.json").is_file() and (final / "adapter_model.safetensors").is_file()
    assert not list(final.glob("*.bin")) and (final / "tokenizer.json").is_file()
    assert (final / "lft_config.yaml").is_file() and (out / "config.yaml").is_file()
    assert 0 < summary["trainable_params"] < summary["total_params"]


def test_sft_full_cli_trains_and_saves_a_transformers_model(lft_run):
    summary = lft_run("--plugin", "full", "trainer.max_steps=30", "trainer.lr=3e-3")
    out = summary["output"]
    assert summary["wrapper"] == "full" and summary["defaults_used"] == ["objective sft"]
    assert_loss_goes_down(out, 30)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out / "final")
    tok = AutoTokenizer.from_pretrained(out / "final")
    assert tok.chat_template and summary["trainable_params"] == summary["total_params"]
    assert (out / "final" / "model.safetensors").is_file()
    assert model(torch.tensor([[1, 2, 3]])).logits.shape[-1] == len(tok)


class Grab:
    """An extension plugin that keeps the trained model when training ends."""

    name = "grab"

    def __init__(self):
        self.model = None

    @lft.hookimpl
    def lft_callbacks(self, config):
        import lightning as L

        plugin = self

        class Keep(L.Callback):
            def on_train_end(self, trainer, pl_module):
                plugin.model = pl_module.model

        return [Keep()]


def fast_config(model, data, output, **extra):
    config = {
        "model.path": str(model),
        "data.train": str(data["train"]),
        "data.eval": str(data["eval"]),
        "output": str(output),
    }
    for item in FAST:
        key, value = item.split("=")
        config[key] = {"true": True, "false": False, "none": None}.get(value, value)
    config.update(extra)
    return config


@pytest.mark.parametrize("wrapper", ["lora", "full"])
def test_saved_model_reloads_with_the_same_logits(tmp_path, lft_tiny_model, lft_sft_data, wrapper):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    grab = Grab()
    config = fast_config(
        lft_tiny_model,
        lft_sft_data,
        tmp_path / "out",
        plugins=[wrapper],
        **{"trainer.max_steps": 5, "trainer.lr": 1e-2},
    )
    result = lft.run(config, plugins=[grab], quiet=True)
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    grab.model.eval()
    with torch.no_grad():
        expected = grab.model(input_ids=ids).logits
        if wrapper == "lora":
            reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(lft_tiny_model), result.final)
        else:
            reloaded = AutoModelForCausalLM.from_pretrained(result.final)
        got = reloaded.eval()(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(lft_tiny_model).eval()(input_ids=ids).logits
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(got, base, atol=1e-3)  # training changed the model


class Interrupt:
    """Simulates Ctrl-C after a given optimizer step."""

    name = "interrupt"

    def __init__(self, at):
        self.at = at

    @lft.hookimpl
    def lft_callbacks(self, config):
        import lightning as L

        at = self.at

        class Stop(L.Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                if trainer.global_step == at:
                    os.kill(os.getpid(), signal.SIGINT)

        return [Stop()]


@pytest.mark.parametrize("packing", [False, True])
def test_resume_continues_from_the_checkpoint_step(tmp_path, lft_tiny_model, lft_sft_data, packing):
    """Packed rows too: packing is deterministic, so the resumed run serves the next packed row."""
    extra = {
        "trainer.max_steps": 8,
        "trainer.lr": 5e-3,
        "trainer.batch_size": 4,
        "plugins": ["lora"],
        "data.packing": packing,
        "data.max_length": 256,
    }
    straight = lft.run(fast_config(lft_tiny_model, lft_sft_data, tmp_path / "straight", **extra), quiet=True)

    output = tmp_path / "interrupted"
    with pytest.raises(lft.LftError, match="interrupted at step 3.*--resume"):
        lft.run(fast_config(lft_tiny_model, lft_sft_data, output, **extra), plugins=[Interrupt(3)], quiet=True)
    assert (output / "checkpoints" / "last.ckpt").is_file()
    resumed = lft.run(fast_config(lft_tiny_model, lft_sft_data, output, resume=True, **extra), quiet=True)
    steps = [h["step"] for h in resumed.history]
    assert steps == [4, 5, 6, 7, 8]
    straight_losses = [h["loss"] for h in straight.history]
    resumed_losses = [h["loss"] for h in history(output)]
    assert resumed_losses == pytest.approx(straight_losses, rel=1e-4)  # same data order, optimizer and schedule


def test_resume_without_checkpoint_and_existing_output_are_errors(tmp_path, capsys, lft_tiny_model, lft_sft_data):
    out = tmp_path / "out"
    base = ["run", "-q", "--model", str(lft_tiny_model), "--data", str(lft_sft_data["train"]), "--output", str(out)]
    assert main(base + ["--resume"]) == 2
    assert "nothing to resume: no checkpoint at" in capsys.readouterr().err
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    assert main(base + FAST + ["trainer.max_steps=1"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (out / "precious.txt").read_text() == "keep me"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data", "missing.jsonl"], "data file missing.jsonl not found"),
        (["--plugin", "dpoo"], "unknown plugin 'dpoo'"),
        (["trainer.lrr=1"], "unknown key 'trainer.lrr'; did you mean 'trainer.lr'?"),
        (["--model", "/no/such/model"], "model path /no/such/model does not exist"),
    ],
)
def test_bad_input_is_one_line(tmp_path, capsys, lft_tiny_model, lft_sft_data, args, message):
    argv = (
        [
            "run",
            "-q",
            "--model",
            str(lft_tiny_model),
            "--data",
            str(lft_sft_data["train"]),
            "--output",
            str(tmp_path / "o"),
        ]
        + FAST
        + args
    )
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_row_without_needed_columns_names_file_and_line(tmp_path, capsys, lft_tiny_model):
    data = tmp_path / "rows.jsonl"
    data.write_text('{"text": "fine"}\n{"question": "no usable column"}\n')
    argv = ["run", "-q", "--model", str(lft_tiny_model), "--data", str(data), "--output", str(tmp_path / "o")] + FAST
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: {data}:2: expected a 'messages', 'prompt' + 'completion' or 'text' column; found question")

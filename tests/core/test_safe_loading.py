"""Safe loading: safetensors only, no pickle unless asked for, no remote code unless asked for."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

import lft
from lft.cli.main import main
from lft.model import loading
from lft.plugin.testing import FAST

ROOT = Path(__file__).resolve().parents[2]


def test_every_torch_load_is_weights_only():
    calls = []
    for path in ROOT.glob("*/**/*.py"):
        if path.parts[len(ROOT.parts)] in ("core", "plugins", "adapters", "losses"):
            text = path.read_text()
            assert not re.search(r"\bpickle\.loads?\(", text), f"{path} unpickles"
            for match in re.finditer(r"torch\.load\(([^)]*)\)", text):
                calls.append((path.name, match.group(1)))
    assert calls, "the search found no torch.load at all; did the layout change?"
    for name, args in calls:
        assert "weights_only=True" in args, f"{name}: torch.load({args}) without weights_only=True"


def test_defaults_trust_no_code_and_no_pickle():
    config = lft.load_config()
    assert config.model.trust_remote_code is False and config.model.allow_pickle is False


@pytest.fixture
def pickle_model(tmp_path, lft_tiny_model):
    from safetensors.torch import load_file

    folder = tmp_path / "pickled"
    shutil.copytree(lft_tiny_model, folder)
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    return folder


def test_pickle_weights_are_refused_with_the_way_to_allow_them(tmp_path, capsys, pickle_model, lft_sft_data):
    argv = [
        "run",
        "-q",
        *FAST,
        "--model",
        str(pickle_model),
        "--data",
        str(lft_sft_data["train"]),
        "--output",
        str(tmp_path / "o"),
        "trainer.max_steps=1",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == (
        f"error: {pickle_model} stores its weights only as pickle (pytorch_model.bin), which lft refuses to "
        "load because unpickling a file can run code; convert it to safetensors, or set "
        "model.allow_pickle=true if you trust it\n"
    )
    assert main(argv + ["model.allow_pickle=true"]) == 0  # read with torch.load(weights_only=True)


def test_pickle_adapter_is_refused(tmp_path):
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    torch.save({}, folder / "adapter_model.bin")
    with pytest.raises(lft.ModelError, match=r"stores its weights only as pickle \(adapter_model.bin\)"):
        loading.check_safe_weights(folder)
    loading.check_safe_weights(folder, allow_pickle=True)
    (folder / "adapter_model.safetensors").write_bytes(b"")
    loading.check_safe_weights(folder)  # safetensors present: the pickle file is not what gets loaded


REMOTE_CODE = """
from pathlib import Path
Path({marker!r}).write_text("remote code ran")
from transformers import LlamaConfig, LlamaForCausalLM

class ShippedConfig(LlamaConfig):
    model_type = "shipped-llama"

class ShippedModel(LlamaForCausalLM):
    config_class = ShippedConfig
"""


def test_remote_code_runs_only_when_trusted(tmp_path, lft_tiny_model):
    folder = tmp_path / "remote"
    shutil.copytree(lft_tiny_model, folder)
    marker = tmp_path / "remote-code-ran"
    config = json.loads((folder / "config.json").read_text())
    config.update(
        model_type="shipped-llama",
        auto_map={"AutoConfig": "shipped.ShippedConfig", "AutoModelForCausalLM": "shipped.ShippedModel"},
    )
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "shipped.py").write_text(REMOTE_CODE.format(marker=str(marker)))
    with pytest.raises(
        lft.ModelError,
        match="lft runs no code shipped with a model unless you set "
        r"model.trust_remote_code=true",
    ):
        loading.load_model(lft.load_config(overrides=[f"model.path={folder}"]))
    assert not marker.exists()
    model, _ = loading.load_model(lft.load_config(overrides=[f"model.path={folder}", "model.trust_remote_code=true"]))
    assert marker.exists() and type(model).__name__ == "ShippedModel"  # the check above could have seen it run


def test_checkpoints_are_safetensors(lft_run):
    from safetensors import safe_open

    summary = lft_run("trainer.max_steps=2", "trainer.checkpoint_every=1")
    with safe_open(str(summary["output"] / "checkpoints" / "last.ckpt"), framework="pt") as handle:
        assert handle.metadata()["format"] == "lft-checkpoint/1" and len(list(handle.keys())) > 0
    from lft.train.checkpoint import _is_pickle

    pickled = [p.name for p in summary["output"].rglob("*") if p.is_file() and _is_pickle(p)]
    assert not pickled, pickled  # nothing lft wrote is a pickle or a torch.save zip

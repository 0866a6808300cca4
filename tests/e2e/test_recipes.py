"""The recipes in docs/recipes/ stay true: every YAML validates into a run config with the values
its page describes, every data file it names is there and reads, and every recipe trains end to
end (on the tiny model, two steps; the code recipe's DPO stage on its own SFT stage's adapter)."""

import json
import math
from pathlib import Path

import pytest

import lft
from lft.cli.main import main
from lft.data.files import read_rows
from lft.plugin.manager import PluginManager
from lft.plugin.testing import FAST

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ROOT / "docs" / "recipes"
FILES = sorted(RECIPES.glob("*.yaml"))
NAMES = [path.stem for path in FILES]


def recipe(name: str) -> Path:
    return RECIPES / f"{name}.yaml"


def test_the_recipes_are_shipped():
    assert {"support-chatbot", "code-sft-r32", "code-dpo", "distillation"} <= set(NAMES)
    readme = (RECIPES / "README.md").read_text(encoding="utf-8")
    for name in NAMES:
        assert f"docs/recipes/{name}.yaml" in readme, f"README.md does not show how to run {name}"


@pytest.mark.parametrize("name", NAMES)
def test_recipe_validates(name, capsys):
    assert main(["config", "validate", str(recipe(name))]) == 0
    assert main(["config", "show", "--config", str(recipe(name))]) == 0
    assert f"output: runs/recipes/{name}" in capsys.readouterr().out
    cfg = lft.load_config(recipe(name))
    PluginManager().select(cfg.plugins)  # the plugins it names exist and combine
    assert cfg.output == f"runs/recipes/{name}"
    assert cfg.data.train and cfg.data.eval, "a recipe ships its own train and eval data"
    assert 0 < cfg.trainer.max_steps <= 40 and cfg.trainer.batch_size <= 8 and cfg.data.max_length <= 512
    text = recipe(name).read_text(encoding="utf-8")
    assert f"lft run --config docs/recipes/{name}.yaml" in text, "the header comment shows the command"
    assert "repository root" in text


@pytest.mark.parametrize("name", NAMES)
def test_recipe_data_exists_and_reads(name):
    cfg = lft.load_config(recipe(name))
    for spec in (cfg.data.train, cfg.data.eval):
        assert not Path(spec).is_absolute() and (ROOT / spec).is_file(), f"{name}: {spec} is missing"
        rows = read_rows(str(ROOT / spec)).rows
        assert len(rows) >= 8
        for row in rows:
            if "dpo" in cfg.plugins:
                assert {"prompt", "chosen", "rejected"} <= set(row) and row["chosen"] != row["rejected"]
            elif "messages" in row:
                assert [m["role"] for m in row["messages"] if m["role"] != "system"][-1] == "assistant"
                assert all(m["content"].strip() for m in row["messages"])
            else:
                assert row["prompt"].strip() and row["completion"].strip()


def test_support_chatbot_is_qlora_sft_on_conversations():
    cfg = lft.load_config(recipe("support-chatbot"))
    assert cfg.plugins == ["sft", "qlora"] and cfg.qlora.bits == 4 and cfg.sft.train_on == "assistant"
    assert cfg.model.path is None  # the embedded model
    rows = read_rows(str(ROOT / cfg.data.train)).rows
    assert len(rows) >= 20 and all(set(row) == {"messages"} for row in rows)
    assert any(row["messages"][0]["role"] == "system" for row in rows)
    assert any(row["messages"][0]["role"] != "system" for row in rows)
    assert any(sum(m["role"] == "assistant" for m in row["messages"]) > 1 for row in rows)  # multi-turn


def test_code_recipe_is_lora_r32_sft_then_dpo_on_its_adapter():
    sft = lft.load_config(recipe("code-sft-r32"))
    assert sft.plugins == ["sft", "lora"] and sft.lora.r == 32 and sft.lora.alpha == 64
    dpo = lft.load_config(recipe("code-dpo"))
    assert dpo.plugins == ["dpo", "lora"] and dpo.lora.r == 32
    assert dpo.model.path == f"{sft.output}/final"  # stage 2 starts from stage 1's adapter
    pairs = read_rows(str(ROOT / dpo.data.train)).rows
    assert all(row["chosen"].startswith("```python\ndef ") for row in pairs)


def test_distillation_is_full_sft_on_reasoning_traces():
    cfg = lft.load_config(recipe("distillation"))
    assert cfg.plugins == ["sft", "full"] and cfg.trainer.lr < 1e-4
    for row in read_rows(str(ROOT / cfg.data.train)).rows:
        assert " = " in row["completion"] and row["completion"].rsplit(". ", 1)[-1].startswith("The answer is ")


# -- end to end on the tiny model -----------------------------------------------------------------


def run_recipe(name: str, output: Path, model: Path) -> dict:
    code = main(
        [
            "run",
            "--quiet",
            "--config",
            str(recipe(name)),
            "--model",
            str(model),
            "--output",
            str(output),
            *FAST,
            "trainer.max_steps=2",
            "trainer.batch_size=2",
            "trainer.warmup_steps=0",
            "data.max_length=512",
        ]
    )  # the tiny model's byte-level tokenizer makes longer rows
    assert code == 0, f"{name} exited with {code}"
    summary = json.loads((output / "summary.json").read_text())
    assert summary["steps"] == 2
    assert math.isfinite(summary["first_loss"]) and math.isfinite(summary["last_loss"])
    assert (output / "final").is_dir()
    return summary


@pytest.fixture
def in_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # the recipes' data paths are relative to the repository root


@pytest.mark.parametrize("name", ["support-chatbot", "distillation"])
def test_recipe_runs_end_to_end(name, in_root, tmp_path, lft_tiny_model):
    summary = run_recipe(name, tmp_path / name, lft_tiny_model)
    wrapper = {"support-chatbot": "qlora", "distillation": "full"}[name]
    assert summary["objective"] == "sft" and summary["wrapper"] == wrapper
    final = tmp_path / name / "final"
    weights = "adapter_model.safetensors" if wrapper == "qlora" else "model.safetensors"
    assert (final / weights).is_file()


def test_code_recipe_runs_sft_then_dpo_on_the_sft_adapter(in_root, tmp_path, lft_tiny_model):
    sft = run_recipe("code-sft-r32", tmp_path / "sft", lft_tiny_model)
    assert sft["objective"] == "sft" and sft["wrapper"] == "lora"
    adapter = json.loads((tmp_path / "sft" / "final" / "adapter_config.json").read_text())
    assert adapter["r"] == 32 and adapter["lora_alpha"] == 64
    dpo = run_recipe("code-dpo", tmp_path / "dpo", tmp_path / "sft" / "final")
    assert dpo["objective"] == "dpo" and dpo["wrapper"] == "lora"
    assert dpo["model"] == str(tmp_path / "sft" / "final")  # trained on the merged SFT model

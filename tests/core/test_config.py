"""Config: sources, plugin sections, validation and its one-line errors."""

import json

import pytest

from lft import config as cfgmod
from lft.cli.main import main
from lft.errors import ConfigError
from lft.plugin.manager import PluginManager


@pytest.fixture(scope="module")
def cls():
    return cfgmod.config_class(cfgmod.plugin_sections(PluginManager()))


def test_defaults_and_plugin_sections(cls):
    cfg = cfgmod.build({}, cls)
    assert cfg.trainer.lr == 2e-4 and cfg.trainer.schedule == "cosine"
    assert cfg.lora.r == 16 and cfg.lora.target_modules == "attention"
    assert cfg.sft.train_on == "assistant"
    assert cfg.model.trust_remote_code is False


def test_sources_are_layered(tmp_path, cls):
    path = tmp_path / "run.yaml"
    path.write_text("plugins: [full]\ntrainer:\n  lr: 0.001\n  batch_size: 2\nlora:\n  r: 8\n")
    cfg = cfgmod.load(
        cls,
        file=path,
        flags={"trainer.batch_size": 3},
        overrides=["lora.r=32", "trainer.lr=1e-4", "lora.target_modules=[q_proj, v_proj]"],
    )
    assert cfg.plugins == ["full"]
    assert cfg.trainer.batch_size == 3  # flag beats file
    assert cfg.trainer.lr == pytest.approx(1e-4)  # override beats file ("1e-4" is a string to YAML)
    assert cfg.lora.r == 32
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]


def test_unknown_key_suggests_the_closest(cls):
    with pytest.raises(ConfigError) as info:
        cfgmod.load(cls, overrides=["trainer.lrr=1", "lora.rank=4", "modle.path=x"])
    problems = info.value.problems
    assert "unknown key 'trainer.lrr'; did you mean 'trainer.lr'?" in problems
    assert any(p.startswith("unknown key 'lora.rank'") and "lora.r" in p for p in problems)
    assert "unknown key 'modle'; did you mean 'model'?" in problems
    assert len(problems) == 3  # every problem at once


def test_bad_values_name_key_value_and_expectation(cls):
    with pytest.raises(ConfigError) as info:
        cfgmod.load(cls, overrides=["trainer.lr=-1", "lora.r=0", "trainer.precision=fp8", "trainer.batch_size=many"])
    text = "\n".join(info.value.problems)
    assert "trainer.lr: input should be greater than 0 (got -1)" in text
    assert "lora.r: input should be greater than 0 (got 0)" in text
    assert "trainer.precision:" in text and '"fp8"' in text
    assert "trainer.batch_size:" in text and '"many"' in text
    assert len(info.value.problems) == 4


def test_file_errors(tmp_path, cls):
    with pytest.raises(ConfigError, match="not found"):
        cfgmod.load(cls, file=tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  lr: [1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml line \d+: invalid YAML"):
        cfgmod.load(cls, file=bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        cfgmod.load(cls, file=scalar)
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        cfgmod.load(cls, overrides=["trainer.lr"])


def test_resume_and_overwrite_conflict(cls):
    with pytest.raises(ConfigError, match="resume and overwrite"):
        cfgmod.build({"resume": True, "overwrite": True}, cls)


def test_python_api_accepts_dotted_dicts():
    from lft.train.engine import config_data, resolve

    cfg = resolve(config_data({"lora.r": 4, "trainer": {"lr": 0.01}}), PluginManager()).config
    assert cfg.lora.r == 4 and cfg.trainer.lr == 0.01


def test_cli_config_show_validate_schema(tmp_path, capsys):
    assert main(["config", "show", "--plugin", "full", "trainer.lr=3e-4"]) == 0
    out = capsys.readouterr().out
    assert "plugins:\n- full" in out and "lr: 0.0003" in out
    good = tmp_path / "good.yaml"
    good.write_text("plugins: [lora]\nlora:\n  r: 8\n")
    assert main(["config", "validate", str(good)]) == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  lrr: 1\n  epochs: 0\n")
    assert main(["config", "validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "2 problem(s)" in err and "did you mean 'trainer.lr'" in err and "trainer.epochs" in err
    assert main(["config", "schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert {"model", "data", "trainer", "lora", "sft"} <= set(schema["properties"])

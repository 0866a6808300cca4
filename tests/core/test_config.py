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


def test_one_run_builds_one_plugin_manager_and_validates_its_config_once(monkeypatch, tmp_path, lft_tiny_model):
    """`lft run` with no data: the objective's default data and its suggested settings are merged
    into the raw settings, which are validated once, with the command line's one plugin manager."""
    from lft import config as cfgmod
    from lft.plugin import manager as manager_module

    managers, builds = [], []
    real_init, real_build = manager_module.PluginManager.__init__, cfgmod.build

    def counting_init(self, *args, **kwargs):
        managers.append(self)
        real_init(self, *args, **kwargs)

    def counting_build(data, cls, source="config"):
        builds.append(data)
        return real_build(data, cls, source)

    monkeypatch.setattr(manager_module.PluginManager, "__init__", counting_init)
    monkeypatch.setattr(cfgmod, "build", counting_build)
    from lft.plugin.testing import FAST

    out = tmp_path / "run"
    assert (
        main(
            [
                "run",
                "--model",
                str(lft_tiny_model),
                "--output",
                str(out),
                "trainer.max_steps=2",
                "trainer.batch_size=2",
                "data.max_eval_rows=4",
                "guards.enabled=false",
                *FAST,
            ]
        )
        == 0
    )
    assert len(managers) == 1 and len(builds) == 1
    written = cfgmod.read_yaml(out / "config.yaml")
    assert written["trainer"]["max_steps"] == 2 and written["trainer"]["batch_size"] == 2  # the user's values
    assert written["trainer"]["lr"] == 1e-3  # the embedded task's suggestion for a key the user left unset
    assert written["data"]["train"].endswith("arith-sft-train.jsonl")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data_default"] is True and "trainer.lr=0.001" in summary["default_data_settings"]
    assert not any(
        item.startswith(("trainer.max_steps=", "trainer.batch_size=")) for item in summary["default_data_settings"]
    )


def test_a_selection_is_a_value():
    """Selecting plugins changes nothing in the manager or its core plugin: two selections coexist."""
    manager = PluginManager()
    core_state = dict(vars(manager.core))
    sft, dpo = manager.select(["sft"]), manager.select(["dpo", "full"])
    assert vars(manager.core) == core_state
    assert (sft.objective, sft.wrapper) == ("sft", "lora") and (dpo.objective, dpo.wrapper) == ("dpo", "full")

    def impls(selection):
        return {impl.plugin_name for impl in selection.hook.lft_format_example.get_hookimpls()}

    assert "sft" in impls(sft) and "dpo" not in impls(sft) and "dpo" in impls(dpo) and "sft" not in impls(dpo)

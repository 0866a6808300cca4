"""Plugin discovery, selection, conflicts, and a fake third-party plugin."""

import pytest

import lft
from lft.errors import PluginError
from lft.plugin.manager import PluginManager


def test_builtins_come_from_entry_points():
    manager = PluginManager()
    for name, kind in (("sft", "objective"), ("full", "wrapper"), ("lora", "wrapper"), ("qlora", "wrapper")):
        info = manager.infos[name]
        assert info.kind == kind and info.source == "entry point" and info.package == "lft"
    assert "lft_wrap_model" in manager.infos["lora"].hooks
    assert manager.infos["core"].kind == "core"
    assert {"lft_quantization_config", "lft_load_model", "lft_wrap_model"} <= set(manager.infos["qlora"].hooks)


def test_defaults_fill_the_selection():
    selection = PluginManager().select([])
    assert (selection.objective, selection.wrapper) == ("sft", "lora")
    assert selection.defaults == ["objective sft", "wrapper lora"]
    selection = PluginManager().select(["full"])
    assert (selection.objective, selection.wrapper, selection.defaults) == ("sft", "full", ["objective sft"])


def test_unknown_plugin_lists_what_is_available():
    with pytest.raises(PluginError) as info:
        PluginManager().select(["loar"])
    message = str(info.value)
    assert "unknown plugin 'loar' (did you mean 'lora'?)" in message
    assert "available: " in message and "full" in message and "sft" in message
    assert "\n" not in message


class FakeObjective:
    name = "fakeobj"
    kind = "objective"


def test_two_objectives_or_two_wrappers_are_refused():
    manager = PluginManager(extra=[FakeObjective()])
    with pytest.raises(PluginError, match="choose one objective, not 2: sft and fakeobj"):
        manager.select(["sft", "fakeobj"])
    with pytest.raises(PluginError, match="choose one wrapper, not 2: lora and full.*model wrappers: full, lora"):
        manager.select(["lora", "full"])


def test_only_selected_plugins_take_part():
    calls = []

    class Recorder:
        name = "recorder"

        @lft.hookimpl
        def lft_callbacks(self, config):
            calls.append("recorder")
            return []

    manager = PluginManager(extra=[Recorder()])
    config = lft.load_config()  # the core plugin's own callbacks read it
    manager.select([]).hook.lft_callbacks(config=config)
    assert calls == []
    manager.select(["recorder"]).hook.lft_callbacks(config=config)
    assert calls == ["recorder"]


def test_misspelled_hook_fails_loudly():
    class Typo:
        name = "typo"

        @lft.hookimpl
        def lft_wrap_modle(self, model, config):
            return model

    with pytest.raises(PluginError, match="typo.*lft_wrap_modle"):
        PluginManager(extra=[Typo()])


def test_wrong_hook_signature_names_plugin_and_hook():
    class BadArgs:
        name = "badargs"

        @lft.hookimpl
        def lft_objective(self, config, extra_argument):
            return None

    with pytest.raises(PluginError, match="badargs.*lft_objective.*unknown argument.*extra_argument"):
        PluginManager(extra=[BadArgs()])


def test_bad_kind_is_refused():
    class Odd:
        name = "odd"
        kind = "sorcery"

    with pytest.raises(PluginError, match="kind 'sorcery'"):
        PluginManager(extra=[Odd()])


def test_python_plugin_replaces_installed_one_of_same_name():
    from lft.plugins.sft import SFT

    class MySFT(SFT):
        pass

    manager = PluginManager(extra=[MySFT()])
    assert type(manager.infos["sft"].obj) is MySFT
    assert manager.infos["sft"].source == "python"

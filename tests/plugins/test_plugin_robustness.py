"""Third-party plugins found through real entry points: broken ones, duplicates, bad signatures,
and the variables that limit which entry points load."""

import importlib
import sys
import textwrap

import pytest

from lft.cli.main import main
from lft.errors import PluginError
from lft.plugin.manager import PluginManager
from lft.plugin.testing import install_fake_distribution

GOOD = textwrap.dedent("""
    import lft

    class Shout:
        name = "shout"
        kind = "extension"

        @lft.hookimpl
        def lft_callbacks(self, config):
            return []
""")


@pytest.fixture
def third_party(tmp_path, monkeypatch):
    """Install fake distributions for one test; they vanish afterwards."""
    monkeypatch.delenv("LFT_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    monkeypatch.delenv("LFT_PLUGINS", raising=False)
    created = []

    def install(name, entry_points, modules=None):
        root = install_fake_distribution(tmp_path / name, name, entry_points, modules)
        monkeypatch.syspath_prepend(str(root))
        created.extend(modules or {})
        importlib.invalidate_caches()

    yield install
    for module in created:
        sys.modules.pop(module, None)


def test_a_third_party_plugin_is_found_listed_and_selectable(third_party, capsys):
    third_party("lft-shout", {"shout": "lft_shout:Shout"}, {"lft_shout": GOOD})
    manager = PluginManager()
    info = manager.infos["shout"]
    assert (info.package, info.version, info.kind, info.hooks) == ("lft-shout", "1.0", "extension", ["lft_callbacks"])
    assert manager.select(["shout"]).extensions == ["shout"]
    assert main(["plugins"]) == 0
    assert "lft-shout" in capsys.readouterr().out


def test_a_plugin_that_fails_to_import_is_named_and_the_rest_work(third_party, capsys):
    third_party("lft-broken", {"broken": "lft_broken:Plugin"}, {"lft_broken": "import not_a_real_module\n"})
    with pytest.warns(UserWarning, match="lft plugin 'broken' from lft-broken failed to load.*not_a_real_module"):
        manager = PluginManager()
    assert manager.infos["broken"].broken
    assert manager.select([]).objective == "sft"  # everything else still works
    with pytest.raises(PluginError, match="plugin 'broken' from lft-broken is installed but failed to load"):
        manager.select(["broken"])
    with pytest.warns(UserWarning):
        assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "broken" in out and "ModuleNotFoundError" in out


def test_two_packages_claiming_one_name_are_both_named(third_party):
    third_party("lft-shout", {"shout": "lft_shout:Shout"}, {"lft_shout": GOOD})
    third_party("lft-shout-fork", {"shout": "lft_shout_fork:Shout"}, {"lft_shout_fork": GOOD})
    with pytest.raises(
        PluginError, match="two installed packages provide the plugin 'shout': lft-shout(-fork)? and lft-shout"
    ):
        PluginManager()


def test_a_plugin_with_an_incompatible_hook_signature_is_named(third_party):
    source = GOOD.replace("def lft_callbacks(self, config):", "def lft_callbacks(self, config, trainer):")
    third_party("lft-old", {"old": "lft_old:Shout"}, {"lft_old": source})
    with pytest.raises(
        PluginError,
        match=r"plugin 'old' from lft-old: hook lft_callbacks\(config, trainer\) does not match "
        r"lft's lft_callbacks\(config\): unknown argument\(s\) trainer",
    ):
        PluginManager()


def test_the_environment_limits_which_entry_points_load(third_party, monkeypatch):
    third_party("lft-shout", {"shout": "lft_shout:Shout"}, {"lft_shout": GOOD})
    monkeypatch.setenv("LFT_PLUGINS", "sft,lora")
    assert set(PluginManager().infos) == {"core", "sft", "lora"}
    monkeypatch.delenv("LFT_PLUGINS")
    monkeypatch.setenv("LFT_DISABLE_PLUGIN_AUTOLOAD", "1")
    infos = PluginManager().infos
    assert "shout" not in infos and "sft" in infos  # lft's own plugins still load

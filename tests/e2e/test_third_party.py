"""Third-party packages, installed for real: the BCO example from the plugin tutorial, and
freshly scaffolded packages of every kind. Each is installed with pip into a temporary folder,
found by lft through its entry point (not a fixture), and its own tests run, training with it."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lft.cli import new_plugin

ROOT = Path(__file__).resolve().parents[2]
BCO = ROOT / "docs" / "examples" / "lft-bco"


def pip_install(package: Path, target: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(package),
        ],
        check=True,
        capture_output=True,
    )


def environment(site: Path) -> dict:
    env = dict(os.environ)
    env.pop("LFT_DISABLE_PLUGIN_AUTOLOAD", None)  # third-party plugins must load here
    env.pop("LFT_PLUGINS", None)
    env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def listed_plugins(site: Path) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "lft.cli", "plugins", "--json"],
        env=environment(site),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return {p["name"]: p for p in json.loads(out)}


def run_tests(package: Path, site: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(package / "tests")],
        env=environment(site),
        capture_output=True,
        text=True,
        cwd=package,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]


def test_bco_example_installs_lists_and_passes_its_tests(tmp_path):
    # Built from a copy, so that no build/ or egg-info folder is left in the docs.
    leftovers = shutil.ignore_patterns("build", "*.egg-info", "__pycache__")
    package = shutil.copytree(BCO, tmp_path / "lft-bco", ignore=leftovers)
    site = tmp_path / "site"
    pip_install(package, site)
    plugins = listed_plugins(site)
    assert plugins["bco"]["package"] == "lft-bco" and plugins["bco"]["kind"] == "objective"
    run_tests(package, site)


@pytest.mark.parametrize("kind", new_plugin.KINDS)
def test_scaffolded_package_works_unedited(tmp_path, kind):
    package = new_plugin.create(f"my_{kind}", kind, tmp_path)
    site = tmp_path / "site"
    pip_install(package, site)
    plugins = listed_plugins(site)
    assert plugins[f"my_{kind}"]["package"] == f"lft-my-{kind}"
    run_tests(package, site)


def test_scaffold_refuses_bad_names_and_existing_folders(tmp_path):
    from lft.errors import LftError

    with pytest.raises(LftError, match="must start with a letter"):
        new_plugin.create("9lives", "objective", tmp_path)
    with pytest.raises(LftError, match="unknown plugin kind 'magic'"):
        new_plugin.create("ok", "magic", tmp_path)
    new_plugin.create("twice", "callback", tmp_path)
    with pytest.raises(LftError, match="already exists"):
        new_plugin.create("twice", "callback", tmp_path)

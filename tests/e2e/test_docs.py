"""The docs stay true: the Python API page runs, the config reference is current, and links
between pages point at files that exist."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(encoding="utf-8"), flags=re.S)


def test_python_api_page_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    blocks = python_blocks(DOCS / "python-api.md")
    assert len(blocks) >= 5
    for number, block in enumerate(blocks, 1):
        try:
            exec(compile(block, f"python-api.md block {number}", "exec"), namespace)
        except Exception as exc:  # name the block that broke
            pytest.fail(f"python-api.md block {number} failed: {type(exc).__name__}: {exc}")


def test_config_reference_is_generated_and_current():
    from lft.cli import docgen

    assert docgen.target().read_text(encoding="utf-8") == docgen.render(), (
        "docs/config-reference.md is stale: run `python -m lft.cli.docgen`"
    )


def test_relative_links_resolve():
    broken = []
    for page in list(DOCS.rglob("*.md")) + [ROOT / "README.md"]:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text(encoding="utf-8")):
            if not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken


def test_tutorial_shows_the_example_package_word_for_word():
    page = (DOCS / "writing-a-plugin.md").read_text(encoding="utf-8")
    shown = dict(re.findall(r"File `([^`]+)`:\n\n```\w+\n(.*?)```\n", page, flags=re.S))
    example = DOCS / "examples" / "lft-bco"
    assert set(shown) == {"pyproject.toml", "lft_bco/loss.py", "lft_bco/__init__.py", "tests/test_bco.py"}
    for relative, text in shown.items():
        assert (example / relative).read_text(encoding="utf-8") == text, f"tutorial copy of {relative} is stale"


def test_site_builds_strictly(tmp_path):
    """mkdocs --strict fails on broken links, pages missing from the nav and bad markup."""
    import subprocess
    import sys

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "--site-dir",
            str(tmp_path / "site"),
            "--config-file",
            str(ROOT / "mkdocs.yml"),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "site" / "writing-a-plugin" / "index.html").is_file()

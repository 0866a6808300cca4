"""The hookspec module is the public API: every hook is documented there and in docs/plugin-hooks.md."""

import inspect
import re
from pathlib import Path

from lft.plugin import hookspecs

DOCS = Path(__file__).resolve().parents[2] / "docs" / "plugin-hooks.md"


def specs():
    return {name: fn for name, fn in vars(hookspecs).items() if name.startswith("lft_") and callable(fn)}


def test_every_hook_has_a_docstring_with_params_and_firstresult_note():
    assert len(specs()) >= 12
    for name, fn in specs().items():
        doc = inspect.getdoc(fn) or ""
        assert len(doc) > 80, f"{name} needs a real docstring"
        for param in inspect.signature(fn).parameters:
            assert f":param {param}:" in doc, f"{name} does not document its parameter {param}"
        opts = fn.lft_spec
        if opts.get("firstresult"):
            assert "Stops at the first non-None result." in doc, name


def test_every_hook_is_in_the_docs_with_its_signature():
    text = DOCS.read_text(encoding="utf-8")
    documented = set(re.findall(r"^### `(lft_\w+)\((.*?)\)`", text, flags=re.M))
    expected = {(name, ", ".join(inspect.signature(fn).parameters)) for name, fn in specs().items()}
    assert expected - documented == set(), f"missing or outdated in {DOCS.name}"
    assert documented - expected == set(), f"{DOCS.name} documents hooks that do not exist"


def test_docs_say_which_hooks_are_firstresult():
    text = DOCS.read_text(encoding="utf-8")
    sections = dict(re.findall(r"^### `(lft_\w+)\(.*?\)`\n\n(.*?)(?=^### |\Z)", text, flags=re.M | re.S))
    for name, fn in specs().items():
        firstresult = fn.lft_spec.get("firstresult")
        assert sections[name].startswith("*firstresult" if firstresult else "*collect"), name


def test_plugin_hooks_page_is_generated_from_the_hookspecs():
    from lft.cli import docgen

    assert DOCS.read_text(encoding="utf-8") == docgen.render_hooks(), (
        "docs/plugin-hooks.md is stale: run `python -m lft.cli.docgen`"
    )

"""The core names no method: no module in core/ keys anything on a method's columns, metric names
or plugin names. Methods are plugins; the core asks them (hooks, ``lft.objective``)."""

import ast
import re
from pathlib import Path

CORE = Path(__file__).resolve().parents[2] / "core"

#: Modules that are about the methods by design.
EXEMPT = {
    "data/task.py": "the embedded task: its data comes in each method's format",
    "plugin/testing.py": "test fixtures for plugin authors: the embedded task in each format",
    "cli/new_plugin.py": "templates of a new plugin's own code",
    "bench/__main__.py": "the benchmark runs each method against the peer",
    "bench/common.py": "the benchmark runs each method against the peer",
    "bench/workers.py": "the benchmark runs each method against the peer",
    "bench/conversations.py": "the benchmark writes sft and preference data",
    "cli/doctor.py": "the machine check runs the benchmark's methods, QLoRA and packed SFT",
}
#: Plugin names, as string constants.
METHODS = {
    "sft",
    "dpo",
    "orpo",
    "simpo",
    "ppo",
    "grpo",
    "kto",
    "cpo",
    "rloo",
    "online_dpo",
    "gkd",
    "lora",
    "qlora",
    "exact_answer",
    "reward_model",
}
#: A method's columns and metrics, as parts of string constants.
COLUMNS_AND_METRICS = ("chosen", "rejected", "pref_", "preference")
#: Exact metric names of methods (the guards' own measurements, perplexity and KL on general text,
#: and the embedded task's accuracy are the core's).
METRICS = {"kl", "margin", "reward", "nll"}
#: Keys look like identifiers; messages and help texts (prose) may mention a method to the user.
KEY = re.compile(r"[\w./{}-]+")
#: Where the core may name a plugin: the defaults of an empty selection.
ALLOWED = {("plugin/manager.py", "sft"), ("plugin/manager.py", "lora")}


def docstrings(tree: ast.AST) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                out.add(id(first.value))
    return out


def embedded_task_forms(tree: ast.AST) -> set[int]:
    """``task.files("sft")``, ``task.path("pref", ...)``: the embedded task's own forms."""
    out = set()
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in ("files", "path")
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id == "task"
        ):
            out |= {id(a) for a in node.args if isinstance(a, ast.Constant)}
    return out


def findings(path: Path) -> list[str]:
    relative = path.relative_to(CORE).as_posix()
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = docstrings(tree) | embedded_task_forms(tree)
    found = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Constant) and isinstance(node.value, str)) or id(node) in skip:
            continue
        text = node.value
        if not KEY.fullmatch(text):
            continue
        bad = (
            (text in METHODS and (relative, text) not in ALLOWED)
            or text in METRICS
            or any(part in text for part in COLUMNS_AND_METRICS)
        )
        if bad:
            found.append(f"core/{relative}:{node.lineno}: {text[:60]!r}")
    return found


def test_no_core_module_names_a_method():
    found = []
    for path in sorted(CORE.rglob("*.py")):
        if path.relative_to(CORE).as_posix() not in EXEMPT:
            found += findings(path)
    assert not found, "the core names a method's plugin, columns or metrics:\n" + "\n".join(found)


def test_the_check_finds_a_planted_name(tmp_path):
    planted = CORE / "_planted_for_test.py"
    planted.write_text(
        'def f(batch):\n    """Uses chosen in a docstring: fine."""\n    return batch["chosen_labels"]\n'
    )
    try:
        assert findings(planted) == ["core/_planted_for_test.py:3: 'chosen_labels'"]
    finally:
        planted.unlink()

"""``lft new-plugin NAME``: write a ready-to-install plugin package.

The package has a pyproject.toml that declares the entry point, a plugin module whose hooks are
commented for the chosen kind, a test that runs the plugin through a real ``lft run`` on lft's
tiny test model, and a README. It installs, shows in ``lft plugins`` and passes its test as it is.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

from lft.errors import LftError

KINDS = ("objective", "wrapper", "reward", "callback")

PYPROJECT = """\
[build-system]
requires = ["setuptools>=70.1"]
build-backend = "setuptools.build_meta"

[project]
name = "lft-{dash}"
version = "0.1.0"
description = "{title}: {a_kind} plugin for lft"
readme = "README.md"
requires-python = ">=3.10"
dependencies = ["lft"]

[project.optional-dependencies]
test = ["pytest>=8"]

# This line is what makes lft find the plugin: `lft plugins` lists it, `lft run --plugin {name}` uses it.
[project.entry-points.lft]
{name} = "lft_{name}:{cls}"

[tool.setuptools]
packages = ["lft_{name}"]
"""

README = """\
# lft-{dash}

{title}: {a_kind} plugin for [lft](https://pypi.org/project/lft/).

```bash
pip install -e .            # now `lft plugins` lists "{name}"
{usage}
pip install -e ".[test]" && python -m pytest -q
```

Edit `lft_{name}/__init__.py`; every hook there is commented. The hook reference is lft's
docs/plugin-hooks.md.
"""

OBJECTIVE = '''\
"""{title}: an lft objective.

As generated, it is supervised fine-tuning where each row may carry a ``weight`` column that
scales its loss. Change ``format_row`` (data -> tokens) and ``{cls}Objective`` (tokens -> loss).
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

import lft
from lft.data import chat, task
from lft.config import Section
from lft.model.forward import token_logprobs
from lft.objective import Objective


class {cls}Options(Section):
    """Options under `{name}.` in configs and on the command line (e.g. `{name}.default_weight=2`)."""

    default_weight: float = Field(1.0, gt=0, description="Weight of rows without a `weight` column.")


class {cls}Objective(Objective):
    """Called every step with the LftModule and a batch; returns (loss, metrics). The contract
    (what else an objective may say: a reference, held-out measurements, ...) is lft.objective."""

    needs_reference = False  # set True if the loss compares against a frozen reference policy

    def units(self, batch: dict) -> dict:
        # What the loss is a mean over, so that gradient accumulation and DDP weigh every unit the
        # same: here, the rows' weights (a weighted mean).
        return {{"weight": batch["weight"].sum()}}

    def __call__(self, module: Any, batch: dict) -> tuple[torch.Tensor, dict]:
        logps, mask = token_logprobs(module.model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        per_example = -(logps * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        weights = batch["weight"].to(per_example.dtype)
        loss = (weights * per_example).sum() / weights.sum()
        return loss, {{"nll": per_example.mean().detach()}}


class {cls}:
    name = "{name}"
    kind = "objective"  # one objective per run
    options = {cls}Options

    @lft.hookimpl
    def lft_add_config(self, register: Any) -> None:
        # Adds the `{name}` section to the config, the CLI (KEY=VALUE) and `lft config schema`.
        register(self.name, self.options)

    @lft.hookimpl
    def lft_default_data(self) -> Any:
        # Data used when the user gives no --data: here, lft's embedded task in SFT form.
        return task.files("sft")

    def format_row(self, example: dict, tokenizer: Any, config: Any) -> dict:
        if "messages" in example:
            ids, labels = chat.tokenize_conversation(tokenizer, example["messages"])
        elif "prompt" in example and "completion" in example:
            ids, labels = chat.tokenize_prompt_completion(tokenizer, example["prompt"], example["completion"])
        else:
            raise lft.DataError("expected 'messages' or 'prompt' + 'completion'")  # lft adds file and line
        ids, labels, truncated = chat.truncate(ids, labels, config.data.max_length)
        weight = float(example.get("weight", config.section(self.name).default_weight))
        return {{"input_ids": ids, "labels": labels, "weight": weight, "truncated": truncated}}

    @lft.hookimpl
    def lft_format_example(self, example: dict, tokenizer: Any, config: Any) -> Any:
        # One raw row -> token ids and labels (-100 = not trained). lft pads and batches them.
        return self.format_row(example, tokenizer, config)

    @lft.hookimpl
    def lft_objective(self, config: Any) -> Any:
        # Called once per run; returns the objective.
        return {cls}Objective()
'''

WRAPPER = '''\
"""{title}: an lft model wrapper.

As generated, it trains only the top ``{name}.top_layers`` transformer blocks and the final norm
and freezes everything else (the saved result is a full transformers model folder).
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

import lft
from lft.config import Section
from lft.model.forward import unwrap


class {cls}Options(Section):
    top_layers: int = Field(1, gt=0, description="How many of the last transformer blocks train.")


class {cls}:
    name = "{name}"
    kind = "wrapper"  # one model wrapper per run
    options = {cls}Options

    @lft.hookimpl
    def lft_add_config(self, register: Any) -> None:
        register(self.name, self.options)

    @lft.hookimpl
    def lft_wrap_model(self, model: Any, config: Any) -> Any:
        # Receives the loaded model; returns the model to train.
        top = config.section(self.name).top_layers
        for param in model.parameters():
            param.requires_grad_(False)
        backbone = unwrap(model).get_decoder()
        for block in list(backbone.layers)[-top:]:
            for param in block.parameters():
                param.requires_grad_(True)
        for param in backbone.norm.parameters():
            param.requires_grad_(True)
        model.train()
        return model
'''

REWARD = '''\
"""{title}: an lft reward function for online methods (PPO, GRPO).

As generated, it rewards short completions: 1.0 at or under ``{name}.target_words`` words,
falling linearly to 0 at twice that.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

import lft
from lft.config import Section


class {cls}Options(Section):
    target_words: int = Field(20, gt=0)
    weight: float = Field(1.0, description="Weight of this reward when several are active.")


def score(completion: str, target_words: int) -> float:
    words = len(completion.split())
    if words <= target_words:
        return 1.0
    return max(0.0, 1.0 - (words - target_words) / target_words)


class {cls}:
    name = "{name}"
    kind = "extension"  # any number of extensions per run
    options = {cls}Options

    @lft.hookimpl
    def lft_add_config(self, register: Any) -> None:
        register(self.name, self.options)

    @lft.hookimpl
    def lft_reward(self, prompts: list, completions: list, batch: dict, config: Any) -> Any:
        # Every selected reward plugin is called; lft adds up weight * scores.
        opts = config.section(self.name)
        return {{"name": self.name, "scores": [score(c, opts.target_words) for c in completions],
                "weight": opts.weight}}
'''

CALLBACK = '''\
"""{title}: an lft extension that adds a Lightning callback to runs.

As generated, it writes the loss of every optimizer step to ``{name}.jsonl`` in the run's output
folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L

import lft


class {cls}Callback(L.Callback):
    def __init__(self, output: str):
        self.path = Path(output) / "{name}.jsonl"
        self._last_step = -1

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self._last_step or trainer.global_rank != 0:
            return  # still accumulating gradients, or not the main process
        self._last_step = trainer.global_step
        loss = pl_module.last_metrics.get("loss")
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({{"step": trainer.global_step, "loss": loss}}) + "\\n")


class {cls}:
    name = "{name}"
    kind = "extension"

    @lft.hookimpl
    def lft_callbacks(self, config: Any) -> Any:
        # Returns Lightning callbacks to add to the run.
        return [{cls}Callback(config.output)]
'''

TESTS = {
    "objective": '''\
"""Runs the plugin through a real `lft run` on lft's tiny test model (fixtures from lft.plugin.testing)."""

import json


def test_{name}_trains(lft_run, lft_sft_data):
    summary = lft_run("--plugin", "{name}", "trainer.max_steps=20", "trainer.lr=1e-2")
    assert summary["objective"] == "{name}"
    losses = [json.loads(x)["loss"] for x in (summary["output"] / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in x]
    assert sum(losses[-3:]) < sum(losses[:3])
''',
    "wrapper": '''\
"""Runs the plugin through a real `lft run` on lft's tiny test model (fixtures from lft.plugin.testing)."""

import json


def test_{name}_trains_only_the_top_layers(lft_run):
    summary = lft_run("--plugin", "{name}", "trainer.max_steps=20", "trainer.lr=1e-2")
    assert summary["wrapper"] == "{name}"
    assert 0 < summary["trainable_params"] < summary["total_params"]
    losses = [json.loads(x)["loss"] for x in (summary["output"] / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in x]
    assert sum(losses[-3:]) < sum(losses[:3])
''',
    "reward": '''\
"""The reward hook scores completions, and lft finds the plugin through its entry point."""

from lft.plugin.manager import PluginManager


def test_{name}_scores():
    manager = PluginManager()
    assert manager.infos["{name}"].kind == "extension"
    selection = manager.select(["{name}"])
    from lft import config as cfg

    config = cfg.build({{}}, cfg.config_class(cfg.plugin_sections(manager)))
    results = selection.hook.lft_reward(prompts=["q", "q"], completions=["short", "word " * 100], batch={{}},
                                        config=config)
    (result,) = results
    assert result["name"] == "{name}" and result["scores"] == [1.0, 0.0]
''',
    "callback": '''\
"""Runs the plugin through a real `lft run` on lft's tiny test model (fixtures from lft.plugin.testing)."""

import json


def test_{name}_writes_the_loss_of_every_step(lft_run):
    summary = lft_run("--plugin", "{name}", "trainer.max_steps=5")
    rows = [json.loads(x) for x in (summary["output"] / "{name}.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
''',
}

MODULES = {"objective": OBJECTIVE, "wrapper": WRAPPER, "reward": REWARD, "callback": CALLBACK}
USAGE = {
    "objective": "lft run --plugin {name}",
    "wrapper": "lft run --plugin {name}",
    "reward": "lft run --plugin grpo --plugin {name}",
    "callback": "lft run --plugin {name}",
}


def class_name(name: str) -> str:
    return "".join(part.capitalize() for part in name.split("_"))


def create(name: str, kind: str, directory: Path) -> Path:
    """Write the package ``lft-NAME`` into ``directory`` and return its folder."""
    name = name.strip().lower().replace("-", "_")
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise LftError(f"plugin name {name!r} must start with a letter and hold only letters, digits and _")
    if kind not in KINDS:
        raise LftError(f"unknown plugin kind {kind!r}; choose one of {', '.join(KINDS)}")
    target = Path(directory) / f"lft-{name.replace('_', '-')}"
    if target.exists():
        raise LftError(f"{target} already exists; choose another name or --dir")
    fields = {
        "name": name,
        "dash": name.replace("_", "-"),
        "cls": class_name(name),
        "kind": kind,
        "a_kind": f"{'an' if kind[0] in 'aeiou' else 'a'} {kind}",
        "title": name.replace("_", " ").capitalize(),
    }
    fields["usage"] = USAGE[kind].format(**fields)
    files = {
        "pyproject.toml": PYPROJECT.format(**fields),
        "README.md": README.format(**fields),
        f"lft_{name}/__init__.py": MODULES[kind].format(**fields),
        f"tests/test_{name}.py": TESTS[kind].format(**fields),
    }
    tmp = target.with_name(f".{target.name}.tmp")
    for relative, text in files.items():
        path = tmp / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text), encoding="utf-8")
    tmp.rename(target)
    return target


def add_command(cli: object) -> None:
    parser = cli.add_parser(  # type: ignore[attr-defined]
        "new-plugin",
        help="create a plugin package to edit",
        description="Write a plugin package lft-NAME: pyproject.toml with the entry point, a module with "
        "commented hooks for the chosen kind, a test and a README. It installs and its test "
        "passes as generated.",
    )
    parser.add_argument("name", help="plugin name, e.g. bco (used as `lft run --plugin NAME`)")
    parser.add_argument("--kind", choices=KINDS, default="objective", help="what the plugin is (default objective)")
    parser.add_argument("--dir", default=".", help="where to create the package folder (default: here)")
    parser.set_defaults(handler=_run_command)


def _run_command(args: object) -> int:
    from rich.console import Console
    from rich.markup import escape

    target = create(args.name, args.kind, Path(args.dir))  # type: ignore[attr-defined]
    Console(highlight=False).print(
        f"created [bold]{target}[/]\n  cd {target} && "
        + escape("pip install -e '.[test]'")
        + " && python -m pytest -q\n"
        f"  lft plugins   # lists {target.name.removeprefix('lft-').replace('-', '_')}"
    )
    return 0

"""Subclassing a built-in method works as a user expects: a ``class MyDPO(DPO)`` that overrides
the loss, or the formatting of one example, is what trains, whether it is passed to ``lft.run``
or published under its own entry point. And every public name of ``lft`` is documented."""

import importlib
import math
import re
import sys
import textwrap
from pathlib import Path

import pytest

import lft
from lft.cli.main import main
from lft.plugin.testing import FAST, install_fake_distribution

# At the first step the policy is the reference, so h = 0 and -log sigmoid(beta * 0 - gamma) =
# log(1 + e^gamma); gamma = 1 gives 1.31326, where plain DPO gives log 2 = 0.69315.
MARGIN_DPO = textwrap.dedent('''
    import torch.nn.functional as F

    from lft.losses.dpo import DPOLoss
    from lft.plugins.dpo import DPO


    class MarginDPOLoss(DPOLoss):
        gamma = 1.0

        def pair_losses(self, h):
            return -F.logsigmoid(self.beta * h - self.gamma)


    class MarginDPO(DPO):
        name = "margin_dpo"

        def loss(self, options):
            return MarginDPOLoss(beta=options.beta)


    class SystemDPO(DPO):
        """Formats every pair with a system message in front of the prompt."""

        name = "system_dpo"
        seen = []

        def format_row(self, example, tokenizer, config):
            prompt = example["prompt"]
            if isinstance(prompt, str):
                prompt = [{"role": "user", "content": prompt}]
            example = {**example, "prompt": [{"role": "system", "content": "Answer with a number."}, *prompt]}
            SystemDPO.seen.append(example["prompt"][0]["content"])
            return super().format_row(example, tokenizer, config)
''')


@pytest.fixture
def published(tmp_path, monkeypatch):
    """The subclasses above, published by a package of their own (entry points, no edit to lft)."""
    monkeypatch.delenv("LFT_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    monkeypatch.delenv("LFT_PLUGINS", raising=False)
    root = install_fake_distribution(
        tmp_path / "dist",
        "lft-mydpo",
        {"margin_dpo": "lft_mydpo:MarginDPO", "system_dpo": "lft_mydpo:SystemDPO"},
        {"lft_mydpo": MARGIN_DPO},
    )
    monkeypatch.syspath_prepend(str(root))
    importlib.invalidate_caches()
    yield importlib.import_module("lft_mydpo")
    sys.modules.pop("lft_mydpo", None)


def run_args(model, data, output, *extra):
    return [
        "run",
        "-q",
        "--model",
        str(model),
        "--data",
        str(data["train"]),
        "--output",
        str(output),
        *FAST,
        "trainer.max_steps=2",
        "eval.task=none",
        *extra,
    ]


def test_a_subclass_passed_to_lft_run_replaces_the_installed_method(tmp_path, lft_tiny_model, lft_pref_data, published):
    class MyDPO(published.MarginDPO):
        name = "dpo"  # the same name as the installed plugin: this run uses the subclass instead

    config = {
        "model.path": str(lft_tiny_model),
        "data.train": str(lft_pref_data["train"]),
        "plugins": ["dpo"],
        **dict(item.split("=", 1) for item in FAST),
        "trainer.max_steps": 2,
        "output": str(tmp_path / "out"),
        "overwrite": True,
    }
    result = lft.run(config, plugins=[MyDPO()], quiet=True)
    assert result.metrics["objective"] == "dpo"
    assert result.metrics["first_loss"] == pytest.approx(math.log1p(math.e), abs=1e-4)
    plain = lft.run({**config, "output": str(tmp_path / "plain")}, quiet=True)
    assert plain.metrics["first_loss"] == pytest.approx(math.log(2), abs=1e-4)


def test_a_subclass_under_its_own_entry_point_trains(tmp_path, capsys, lft_tiny_model, lft_pref_data, published):
    assert main(run_args(lft_tiny_model, lft_pref_data, tmp_path / "m", "--plugin", "margin_dpo")) == 0
    metrics = [line for line in (tmp_path / "m" / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    import json

    assert json.loads(metrics[0])["loss"] == pytest.approx(math.log1p(math.e), abs=1e-4)
    # The subclass has its own config section, inherited from DPO's options.
    assert main(["config", "show", "--plugin", "margin_dpo", "margin_dpo.beta=0.3"]) == 0
    assert "beta: 0.3" in capsys.readouterr().out


def test_overriding_the_formatting_of_one_example(tmp_path, lft_tiny_model, lft_pref_data, published):
    published.SystemDPO.seen.clear()
    assert main(run_args(lft_tiny_model, lft_pref_data, tmp_path / "s", "--plugin", "system_dpo")) == 0
    assert published.SystemDPO.seen and set(published.SystemDPO.seen) == {"Answer with a number."}


def doc_rrhf() -> str:
    """The RRHF plugin exactly as docs/writing-a-plugin.md shows it ("A shorter route")."""
    page = (Path(__file__).resolve().parents[2] / "docs" / "writing-a-plugin.md").read_text(encoding="utf-8")
    section = page[page.index("## A shorter route") :]
    return re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)


RRHF = doc_rrhf() + textwrap.dedent('''


    class BadOptions(Preference):
        """Options that are not preference options: a one-line error, not a traceback."""

        name = "bad_options"

        def loss(self, options):
            raise AssertionError("never reached")
''')


def test_a_reference_free_subclass_with_its_own_options_trains_from_the_cli(
    tmp_path, monkeypatch, capsys, lft_tiny_model, lft_pref_data
):
    import json

    from pydantic import BaseModel

    monkeypatch.delenv("LFT_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    monkeypatch.delenv("LFT_PLUGINS", raising=False)
    root = install_fake_distribution(tmp_path / "dist", "lft-rrhf", {"rrhf": "lft_rrhf:RRHF"}, {"lft_rrhf": RRHF})
    monkeypatch.syspath_prepend(str(root))
    importlib.invalidate_caches()
    try:
        assert (
            main(
                run_args(
                    lft_tiny_model,
                    lft_pref_data,
                    tmp_path / "c",
                    "--plugin",
                    "rrhf",
                    "rrhf.nll_weight=0.5",
                    "--eval-data",
                    str(lft_pref_data["eval"]),
                    "eval.before=true",
                    "trainer.max_steps=8",
                    "trainer.lr=1e-3",
                )
            )
            == 0
        )
        summary = json.loads((tmp_path / "c" / "summary.json").read_text())
        assert summary["objective"] == "rrhf"
        assert summary["after"]["eval_loss"] < summary["before"]["eval_loss"]  # the held-out RRHF loss fell
        assert main(["config", "show", "--plugin", "rrhf"]) == 0
        import yaml

        section = yaml.safe_load(capsys.readouterr().out)["rrhf"]  # its own options and the shared ones, no others
        assert section == {
            "bad_pairs": "skip",
            "use_chat_template": True,
            "chat_template": None,
            "nll_weight": 1.0,
        }
        module = importlib.import_module("lft_rrhf")
        # by hand: chosen -3 over 2 tokens (mean -1.5), rejected -2 over 2 (mean -1): max(0, -1 - -1.5) = 0.5;
        # the NLL of 3 nats over 2 tokens = 1.5
        import torch

        from lft.losses.preference import PairLogps

        loss = module.RRHF().loss(module.RRHFOptions())
        assert not getattr(loss, "needs_reference", False)  # reference-free: the run keeps no reference
        out = loss(PairLogps(torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([2.0]), torch.tensor([2.0])))
        assert out.terms["pairs"].item() == pytest.approx(0.5)
        assert out.terms["chosen_tokens"].item() == pytest.approx(1.5)
        assert out.loss.item() == pytest.approx(2.0)

        class NotPreference(BaseModel):
            beta: float = 0.1

        module.BadOptions.options = NotPreference
        with pytest.raises(
            lft.PluginError, match="BadOptions.options must subclass lft.plugins.preference.PreferenceOptions"
        ):
            module.BadOptions().lft_add_config(register=lambda name, options: None)
        # the embedded default data's suggested settings land in the subclass's own section
        from lft.plugins.dpo import DPO

        assert module.RRHF().lft_default_data()["settings"] == {
            "trainer.max_steps": 40,
            "trainer.batch_size": 4,
            "trainer.lr": 5e-4,
        }

        class MyDPO(DPO):
            name = "my_dpo"

        assert MyDPO().lft_default_data()["settings"]["my_dpo.nll_weight"] == 1.0
        assert not any(key.startswith("dpo.") for key in MyDPO().lft_default_data()["settings"])
    finally:
        sys.modules.pop("lft_rrhf", None)


def test_every_public_name_has_a_docstring():
    missing = [name for name in lft.__all__ if name != "__version__" and not (getattr(lft, name).__doc__ or "").strip()]
    assert not missing, f"public names without a docstring: {missing}"
    assert lft.__doc__ and all(f"lft.{name}" in lft.__doc__ for name in ("run", "load", "merge", "hookimpl"))

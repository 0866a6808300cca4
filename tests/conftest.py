"""Shared test setup. The fixtures themselves (tiny model, datasets, lft_run) come from lft's
pytest plugin, lft.plugin.testing, exactly as a plugin author gets them."""

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault(
    "LFT_DISABLE_PLUGIN_AUTOLOAD", "1"
)  # third-party plugins installed here stay out of lft's own tests

import torch  # noqa: E402

# Tiny models run an order of magnitude faster on one thread when the CPU is shared: with two,
# every small op waits for the second thread (measured here: 12 ms vs 211 ms per forward pass
# of the tiny model at load average 6 on 2 cores).
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """Every test under tests/e2e trains end to end (a whole run through the command line, a
    package installed and tested, the documentation's examples run): the ``slow`` marker, so that
    ``python -m pytest -m "not slow"`` runs the fast subset."""
    import pytest

    for item in items:
        if "e2e" in item.path.parts:
            item.add_marker(pytest.mark.slow)

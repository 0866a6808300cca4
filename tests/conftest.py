"""Shared test setup. The fixtures themselves (tiny model, datasets, lft_run) come from lft's
pytest plugin, lft.testing, exactly as a plugin author gets them."""

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("LFT_DISABLE_PLUGIN_AUTOLOAD", "1")  # third-party plugins installed here stay out of lft's own tests

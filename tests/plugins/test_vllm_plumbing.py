"""The vllm plugin's parts that need no vLLM: what a run says when vLLM, or its server, is missing,
and when the colocated engine meets several processes. tests/plugins/test_vllm.py runs the engine."""

import types

import pytest

import lft
from lft.plugins.vllm_rollout import VLLM
from lft.plugins.vllm_server import RemoteSampler
from lft.train.engine import resolve


def test_the_vllm_plugin_without_vllm_says_what_to_install(capsys, lft_tiny_model, lft_prompt_data, tmp_path):
    import importlib.util

    from lft.cli.main import main
    from lft.plugin.testing import FAST

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here: tests/plugins/test_vllm.py runs it")
    code = main(
        [
            "run",
            "--plugin",
            "grpo",
            "--plugin",
            "exact_answer",
            "--plugin",
            "vllm",
            "--model",
            str(lft_tiny_model),
            "--data",
            str(lft_prompt_data["train"]),
            "--output",
            str(tmp_path / "o"),
            "trainer.max_steps=1",
            "guards.enabled=false",
            *FAST,
        ]  # fmt: skip
    )
    err = capsys.readouterr().err
    assert code == 2 and 'needs vLLM: pip install -e ".[vllm]"' in err and len(err.strip().splitlines()) == 1


def test_a_run_without_a_server_says_how_to_start_one():
    with pytest.raises(
        lft.PluginError, match=r"no lft vllm-serve answered at http://127.0.0.1:9 within 1 s .*lft vllm-serve --model"
    ):
        RemoteSampler("http://127.0.0.1:9", timeout=1)


def test_a_colocated_engine_under_ddp_says_to_use_the_server(lft_tiny_model):
    config = resolve(
        {"model": {"path": str(lft_tiny_model)}, "plugins": ["grpo", "vllm"]}, lft.plugin.manager.PluginManager()
    ).config
    module = types.SimpleNamespace(_trainer=types.SimpleNamespace(global_rank=1, world_size=2))
    with pytest.raises(
        lft.PluginError,
        match="this run has 2 processes: start one engine with `lft vllm-serve` and set vllm.mode=server",
    ):
        VLLM().start(module, config, 8)

"""The benchmark harness runs (lft side, 2 steps, tiny model) so that it cannot rot.
No timing is asserted: timings belong to the benchmark's report, not to tests."""

import json

import pytest

from lft.bench.__main__ import main
from lft.bench.common import flops_per_token


@pytest.mark.slow
def test_harness_smoke(tmp_path, lft_tiny_model):
    out = tmp_path / "bench"
    code = main(
        [
            "--method",
            "sft",
            "--steps",
            "2",
            "--warmup",
            "0",
            "--tools",
            "lft",
            "--model",
            str(lft_tiny_model),
            "--precision",
            "32-true",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    report = json.loads((out / "bench.json").read_text())
    (side,) = report["methods"]["sft"]["sides"]
    assert side["tool"] == "lft" and side["steps"] == 2
    assert side["tokens_per_s"] > 0 and side["peak_rss_mb"] > 0 and side["final_loss"] > 0
    assert "| sft | lft |" in (out / "bench.md").read_text()


def test_flops_per_token_counts_every_matmul(lft_tiny_model):
    """Tiny model: hidden 64, intermediate 128, 2 layers, 4 heads / 2 kv heads (kv width 32).
    Per layer: q, o 2*64*64 + k, v 2*64*32 + gate, up, down 3*64*128 = 8192 + 4096 + 24576 = 36864.
    N = 2 * 36864 + vocab * 64; LoRA SFT costs 4N per token, DPO adds the reference forward (6N)."""
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(lft_tiny_model).vocab_size
    n = 2 * 36864 + vocab * 64
    assert flops_per_token(str(lft_tiny_model), "sft") == 4 * n
    assert flops_per_token(str(lft_tiny_model), "dpo") == 6 * n

"""The benchmark harness runs (lft side, 2 steps, tiny model) so that it cannot rot.
No timing is asserted: timings belong to the benchmark's report, not to tests."""

import json

import pytest

from lft.bench.__main__ import main
from lft.bench.common import flops_per_token


def lft_side(model, out, *extra):
    """The harness's arguments for two SFT steps of lft alone on ``model``, in fp32."""
    return ["--method", "sft", "--steps", "2", "--warmup", "0", "--tools", "lft", "--model", str(model),
            "--precision", "32-true", "--out", str(out), *extra]  # fmt: skip


@pytest.mark.slow
def test_harness_smoke(tmp_path, lft_tiny_model):
    out = tmp_path / "bench"
    code = main(lft_side(lft_tiny_model, out))
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


def test_the_conversation_generator_is_deterministic_and_long_tailed(tmp_path):
    from lft.bench.conversations import write

    first, again, other = (write(tmp_path / n, rows=300, seed=s) for n, s in (("a", 0), ("b", 0), ("c", 1)))
    assert first.read_bytes() == again.read_bytes() != other.read_bytes()
    rows = [json.loads(line) for line in first.read_text().splitlines()]
    assert all(r["completion"][0]["role"] == "assistant" and r["prompt"][-1]["role"] == "user" for r in rows)
    assert 0.2 < sum(r["prompt"][0]["role"] == "system" for r in rows) / len(rows) < 0.5
    words = sorted(sum(len(m["content"].split()) for m in r["prompt"] + r["completion"]) for r in rows)
    median = words[len(words) // 2]
    assert 100 < median < 400 and words[-1] > 5 * median and words[0] < median / 3  # a long tail both ways


@pytest.mark.slow
def test_harness_takes_a_data_file_and_lft_settings(tmp_path, lft_tiny_model):
    from lft.bench.conversations import write

    data = write(tmp_path / "conversations.jsonl", rows=40)
    out = tmp_path / "bench"
    args = lft_side(lft_tiny_model, out, "--data", str(data), "--max-length", "512", "--lft-set", "data.packing=true")
    assert main(args) == 0
    report = json.loads((out / "bench.json").read_text())
    assert report["data"] == str(data) and report["lft_overrides"] == {"data.packing": "true"}
    (side,) = report["methods"]["sft"]["sides"]
    assert side["steps"] == 2 and side["final_loss"] > 0

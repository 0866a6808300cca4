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


def test_the_pair_generator_prefers_the_full_answer(tmp_path):
    from lft.bench.conversations import write

    rows = [json.loads(line) for line in write(tmp_path / "p.jsonl", rows=50, pairs=True).read_text().splitlines()]
    assert all(r["chosen"][0]["content"] != r["rejected"][0]["content"] for r in rows)
    assert all(r["prompt"][-1]["role"] == "user" for r in rows)
    assert write(tmp_path / "q.jsonl", rows=50, pairs=True).read_bytes() == (tmp_path / "p.jsonl").read_bytes()


def test_sized_rows_have_the_asked_length(tmp_path, lft_tiny_model):
    from transformers import AutoTokenizer

    from lft.bench.conversations import sized

    tokenizer = AutoTokenizer.from_pretrained(lft_tiny_model)
    for length in (300, 800):  # the tiny tokenizer has short tokens: a system prompt and a question take ~130
        rows = [
            json.loads(x)
            for x in sized(tmp_path / f"{length}.jsonl", tokenizer, length, rows=6).read_text().split("\n")
            if x
        ]
        counts = [len(tokenizer.apply_chat_template(r["prompt"] + r["completion"], return_dict=False)) for r in rows]
        assert all(length - 12 <= n <= length for n in counts), counts


def test_memory_slope_tells_linear_from_quadratic_growth():
    from lft.bench.__main__ import memory_slope

    lengths = [256, 512, 1024, 2048, 4096]
    sweep = [{"tool": "linear", "length": n, "peak_rss_mb": 1000 + 0.5 * n} for n in lengths]
    sweep += [{"tool": "quadratic", "length": n, "peak_rss_mb": 1000 + 0.1 * n + n * n / 1000} for n in lengths]
    fits = memory_slope(sweep)
    assert fits["linear"]["mb_per_1k_tokens"] == pytest.approx(500)
    assert fits["linear"]["quadratic_share"] == pytest.approx(0.0, abs=1e-6)
    # at 4096 tokens: 16777 MB from the square term, 410 from the linear one
    assert fits["quadratic"]["quadratic_share"] == pytest.approx(16777.216 / (16777.216 + 409.6))


def test_each_lft_side_is_compared_with_the_peer_at_its_defaults_and_its_best():
    from lft.bench.__main__ import compare

    sides = [
        {"tool": "lft", "tokens_per_s": 300.0, "steps_per_s": 1.0, "peak_rss_mb": 900.0},
        {"tool": "lft-packed", "tokens_per_s": 600.0, "steps_per_s": 0.5, "peak_rss_mb": 600.0},
        {"tool": "peer", "tokens_per_s": 100.0, "steps_per_s": 0.5, "peak_rss_mb": 1000.0},
        {"tool": "peer-packed", "tokens_per_s": 200.0, "steps_per_s": 0.25, "peak_rss_mb": 1200.0},
    ]
    out = compare(sides)
    assert out["peer_best"] == "peer-packed"
    assert out["lft"]["vs_peer"]["tokens_per_s"] == 3.0 and out["lft"]["vs_peer"]["peak_rss"] == 0.9
    assert (
        out["lft-packed"]["vs_peer_best"]["tokens_per_s"] == 3.0
        and out["lft-packed"]["vs_peer_best"]["peak_rss"] == 0.5
    )


@pytest.mark.slow
def test_harness_sweeps_sequence_length(tmp_path, lft_tiny_model):
    out = tmp_path / "bench"
    assert main(lft_side(lft_tiny_model, out, "--sweep-length", "64,128,256", "--sweep-steps", "2")) == 0
    report = json.loads((out / "bench.json").read_text())
    assert [r["length"] for r in report["sweep"]] == [64, 128, 256]
    assert all(r["tokens_per_s"] > 0 for r in report["sweep"])
    assert set(report["memory_slope"]) == {"lft"} and (out / "sweep.png").stat().st_size > 0
    assert "Length sweep" in (out / "bench.md").read_text()


@pytest.mark.slow
def test_harness_runs_the_real_shaped_data_and_the_packed_sides(tmp_path, lft_tiny_model):
    out = tmp_path / "bench"
    args = lft_side(lft_tiny_model, out, "--real-shaped", "--real-max-length", "256", "--real-steps", "2")
    args[args.index("sft")] = "sft,dpo"
    args[args.index("lft")] = "lft,lft-packed"
    assert main(args) == 0
    report = json.loads((out / "bench.json").read_text())
    assert list(report["methods"]) == ["sft", "dpo", "sft (real-shaped)", "dpo (real-shaped)"]
    for key, entry in report["methods"].items():
        assert [s["tool"] for s in entry["sides"]] == ["lft", "lft-packed"], key
        assert all(s["tokens_per_s"] > 0 for s in entry["sides"])
    assert report["methods"]["dpo (real-shaped)"]["max_length"] == 256 and "errors" not in report


def test_the_rollout_summary_splits_online_steps():
    from lft.bench.__main__ import rollout_summary

    steps = [
        {"time": 3.0, "tokens": 10, "generation_s": 2.0, "generated_tokens": 100},
        {"time": 5.0, "tokens": 10, "generation_s": 3.0, "generated_tokens": 200},
    ]
    # 300 tokens in 5 s of generation; medians of generation (2.5) and of the rest (1 and 2: 1.5)
    assert rollout_summary(steps) == {
        "rollout_tokens_per_s": 60.0,
        "generation_s_per_step": 2.5,
        "rest_s_per_step": 1.5,
    }
    assert rollout_summary([{"time": 1.0, "tokens": 5}]) == {}  # an offline method has no rollout


@pytest.mark.slow
def test_harness_reports_grpo_rollouts_and_skips_vllm_where_absent(tmp_path, lft_tiny_model, capsys):
    import importlib.util

    out = tmp_path / "bench"
    args = lft_side(lft_tiny_model, out)
    args[args.index("sft")] = "grpo"
    args[args.index("lft")] = "lft,lft-vllm"
    assert main([*args, "--batch-size", "4", "--num-generations", "2", "--max-new-tokens", "4"]) == 0
    report = json.loads((out / "bench.json").read_text())
    sides = {s["tool"]: s for s in report["methods"]["grpo"]["sides"]}
    assert sides["lft"]["rollout_tokens_per_s"] > 0 and sides["lft"]["generation_s_per_step"] > 0
    assert "| grpo | lft |" in (out / "bench.md").read_text().split("Online methods")[1]
    if importlib.util.find_spec("vllm") is None:
        assert set(sides) == {"lft"} and "lft-vllm: vLLM is not installed here" in capsys.readouterr().out

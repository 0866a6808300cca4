"""Using trained adapters: many on one base, generate, chat, merge, and bad input."""

import io
import json
import shutil

import pytest
import torch

import lft
from lft.cli.main import main
from lft.plugin.testing import FAST, save_tiny_model

PROMPTS = [
    "Tom has 3 apples and gets 4 more. How many apples does Tom have?",
    "Ana has 9 coins and gives 2 away. How many coins are left?",
    "Sam has 2 bags with 5 shells in each bag. How many shells?",
]


def train_adapter(model, data, output, seed, lr=1e-2, steps=5):
    config = {
        "model.path": str(model),
        "data.train": str(data["train"]),
        "data.eval": str(data["eval"]),
        "output": str(output),
        "plugins": ["lora"],
        "trainer.max_steps": steps,
        "trainer.lr": lr,
        "trainer.seed": seed,
        "lora.r": 4,
    }
    for item in FAST:
        key, value = item.split("=")
        config.setdefault(key, {"true": True, "false": False, "none": None}.get(value, value))
    return lft.run(config, quiet=True).final


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, lft_tiny_model, lft_sft_data):
    root = tmp_path_factory.mktemp("adapters")
    return {
        "a": train_adapter(lft_tiny_model, lft_sft_data, root / "a", seed=1),
        "b": train_adapter(lft_tiny_model, lft_sft_data, root / "b", seed=2, lr=2e-2),
    }


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_each_adapter_on_a_shared_base_equals_that_adapter_loaded_alone(lft_tiny_model, adapters):
    both = lft.load(str(lft_tiny_model), adapters={"a": adapters["a"], "b": adapters["b"]})
    assert both.names == ["a", "b"]
    out = {name: both.generate(PROMPTS, adapter=name, max_new_tokens=12) for name in ("a", "b", "base")}
    assert len({tuple(v) for v in out.values()}) == 3  # every adapter answers differently
    assert both.generate(PROMPTS, adapter="a", max_new_tokens=12) == out["a"]  # switching back is exact
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    for name in ("a", "b"):
        alone = lft.load(str(lft_tiny_model), adapters=adapters[name])
        assert alone.generate(PROMPTS, max_new_tokens=12) == out[name]
        with both.using(name):
            shared = logits(both.model, ids)
        assert torch.allclose(shared, logits(alone.model, ids), atol=1e-6)
    from transformers import AutoModelForCausalLM

    with both.using("base"):
        base = logits(both.model, ids)
    assert torch.allclose(base, logits(AutoModelForCausalLM.from_pretrained(lft_tiny_model).eval(), ids), atol=1e-6)
    with pytest.raises(lft.LftError, match="several adapters are loaded \\(a, b\\)"):
        both.generate(PROMPTS)


def test_generate_is_deterministic_with_a_seed(lft_tiny_model, adapters):
    loaded = lft.load(str(lft_tiny_model), adapters=adapters["a"])
    sample = dict(max_new_tokens=16, temperature=1.0, top_p=0.95)
    first = loaded.generate(PROMPTS, seed=7, **sample)
    assert loaded.generate(PROMPTS, seed=7, **sample) == first
    assert loaded.generate(PROMPTS, seed=8, **sample) != first
    assert loaded.generate(PROMPTS[0], seed=7, max_new_tokens=16) == loaded.generate(PROMPTS[0], max_new_tokens=16)


def test_generate_cli_writes_jsonl_per_named_adapter(tmp_path, capsys, lft_tiny_model, adapters):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[:2]) + "\n\n")
    out = tmp_path / "out.jsonl"
    argv = [
        "generate",
        "--model",
        str(lft_tiny_model),
        "--adapter",
        f"a={adapters['a']}",
        "--adapter",
        f"b={adapters['b']}",
        "--prompts",
        str(prompts),
        "--out",
        str(out),
        "--max-new-tokens",
        "10",
    ]
    assert main(argv) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["adapter"], r["prompt"]) for r in rows] == [(n, p) for n in ("a", "b") for p in PROMPTS[:2]]
    both = lft.load(str(lft_tiny_model), adapters={"a": adapters["a"], "b": adapters["b"]})
    for name in ("a", "b"):
        assert [r["completion"] for r in rows if r["adapter"] == name] == both.generate(
            PROMPTS[:2], adapter=name, max_new_tokens=10
        )
    capsys.readouterr()
    assert main(["generate", "--adapter", str(adapters["a"]), "--prompt", PROMPTS[0], "--max-new-tokens", "10"]) == 0
    assert capsys.readouterr().out.strip() == both.generate(PROMPTS[0], adapter="a", max_new_tokens=10).strip()
    # The prompt as a positional argument, as llm and ollama run take it; a "=" in it stays text.
    assert main(["generate", "--adapter", str(adapters["a"]), PROMPTS[0], "2+2=?", "--max-new-tokens", "10"]) == 0
    want = [c.strip() for c in both.generate([PROMPTS[0], "2+2=?"], adapter="a", max_new_tokens=10)]
    assert capsys.readouterr().out.strip().splitlines() == "\n".join(want).splitlines()


def test_chat_streams_replies_and_switches_adapters(monkeypatch, capsys, lft_tiny_model, adapters):
    both = lft.load(str(lft_tiny_model), adapters={"a": adapters["a"], "b": adapters["b"]})
    expected_a = both.generate(PROMPTS[0], adapter="a", max_new_tokens=10)
    expected_b = both.generate(PROMPTS[0], adapter="b", max_new_tokens=10)
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{PROMPTS[0]}\n/adapter b\n/reset\n{PROMPTS[0]}\n/exit\n"))
    argv = [
        "chat",
        "--model",
        str(lft_tiny_model),
        "--adapter",
        f"a={adapters['a']}",
        "--adapter",
        f"b={adapters['b']}",
        "--max-new-tokens",
        "10",
    ]
    assert main(argv) == 0
    captured = capsys.readouterr()
    replies = [part.split("\nyou> ")[0].strip() for part in captured.out.split("assistant> ")[1:]]
    assert replies == [expected_a.strip(), expected_b.strip()]
    assert "now answering with b" in captured.err


def test_merge_folds_the_adapter_into_a_plain_model(tmp_path, capsys, lft_tiny_model, adapters):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged"
    assert main(["merge", str(adapters["a"]), "-o", str(out)]) == 0
    assert "merged" in capsys.readouterr().err
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    assert AutoTokenizer.from_pretrained(out).chat_template
    ids = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 11]])
    merged = logits(AutoModelForCausalLM.from_pretrained(out).eval(), ids)
    base = AutoModelForCausalLM.from_pretrained(lft_tiny_model).eval()
    plain = logits(base, ids)
    with_adapter = logits(PeftModel.from_pretrained(base, str(adapters["a"])).eval(), ids)
    assert torch.allclose(merged, with_adapter, atol=1e-5)
    assert not torch.allclose(merged, plain, atol=1e-3)
    assert main(["merge", str(adapters["a"]), "-o", str(out)]) == 2  # never overwrites unasked
    assert "already exists; pass --overwrite" in capsys.readouterr().err


def test_merge_finds_the_base_from_the_run_config_when_the_recorded_folder_is_gone(tmp_path, lft_tiny_model, adapters):
    """An adapter of the embedded GGUF model records lft's converted cache folder as its base; when
    that cache is cleared, the run's config (model.path) still names the base."""
    adapter = tmp_path / "adapter"
    shutil.copytree(adapters["a"], adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "cleared-cache" / "model")
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    info = lft.merge(adapter, tmp_path / "merged")
    assert info["base"] == str(lft_tiny_model) and info["trained_on"] is None
    assert (tmp_path / "merged" / "config.json").is_file()


def adapter_for_other_base(tmp_path, hidden):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    other = save_tiny_model(tmp_path / f"other-{hidden}", hidden=hidden)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(other), LoraConfig(r=2, target_modules=["q_proj", "v_proj"])
    )
    model.save_pretrained(tmp_path / f"adapter-{hidden}")
    return other, tmp_path / f"adapter-{hidden}"


def one_line_error(capsys, argv):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    return err


def test_generate_without_a_prompt_or_with_two_sources_says_so(tmp_path, capsys, lft_tiny_model):
    prompts = tmp_path / "p.txt"
    prompts.write_text("hi\n")
    err = one_line_error(capsys, ["generate", "--model", str(lft_tiny_model)])
    assert 'no prompt; give one: lft generate "TEXT"' in err
    err = one_line_error(capsys, ["generate", "--model", str(lft_tiny_model), "hi", "--prompts", str(prompts)])
    assert "not both" in err


def test_bad_adapters_are_one_line_errors(tmp_path, capsys, lft_tiny_model):
    gen = ["generate", "--model", str(lft_tiny_model), "--prompt", "hi", "--adapter"]
    err = one_line_error(capsys, gen + [str(tmp_path / "missing")])
    assert f"adapter folder {tmp_path / 'missing'} does not exist" in err
    err = one_line_error(capsys, gen + [str(lft_tiny_model)])
    assert "is not an adapter folder: it has no adapter_config.json (it is a model folder" in err

    other, adapter = adapter_for_other_base(tmp_path, hidden=96)
    err = one_line_error(capsys, gen + [str(adapter)])
    assert f"adapter {adapter} was trained on {other} (LlamaForCausalLM, hidden 96" in err
    assert f"but the model is {lft_tiny_model} (LlamaForCausalLM, hidden 64" in err

    shutil.rmtree(other)  # the recorded base is gone: the adapter's own weight shapes still tell
    err = one_line_error(capsys, gen + [str(adapter)])
    assert (
        f"adapter {adapter} (trained on {other}) expects layer model.layers.0.self_attn.q_proj to map 96 -> 96" in err
    )
    assert "it maps 64 -> 64" in err
    err = one_line_error(capsys, ["generate", "--adapter", f"base={adapter}", "--prompt", "hi"])
    assert "adapter name 'base' is not allowed" in err

"""``lft export``: an adapter merged and written as GGUF, read back by transformers (as lft reads
every GGUF file) and by the gguf package's own reader; its check; the Ollama Modelfile."""

import json

import gguf
import pytest
import torch
from test_inference import PROMPTS, train_adapter

import lft
import lft.use.export as export_module
from lft.cli.main import main
from lft.errors import ModelError
from lft.use.export import export, render_chatml


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, lft_tiny_model, lft_sft_data):
    return train_adapter(lft_tiny_model, lft_sft_data, tmp_path_factory.mktemp("export") / "run", seed=3, lr=2e-2)


def test_an_adapter_exported_in_f32_answers_exactly_as_the_merged_model(tmp_path, capsys, adapter, lft_tiny_model):
    out = tmp_path / "tiny.gguf"
    assert main(["export", str(adapter), "--outtype", "f32", "-o", str(out)]) == 0
    assert "checked against the source" in capsys.readouterr().err
    # The round trip: lft generate --model FILE.gguf gives the merged adapter's greedy answers.
    merged = lft.load(str(lft_tiny_model), adapters=str(adapter))
    want = merged.generate(PROMPTS, max_new_tokens=12)
    from_gguf = lft.load(str(out))
    assert from_gguf.generate(PROMPTS, max_new_tokens=12) == want
    assert main(["generate", "--model", str(out), PROMPTS[0], "--max-new-tokens", "12"]) == 0
    assert capsys.readouterr().out.strip() == want[0].strip()
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    with torch.no_grad():
        difference = (from_gguf.model(input_ids=ids).logits - merged.model(input_ids=ids).logits).abs().max()
    assert float(difference) < 1e-4


def test_the_file_carries_what_llama_cpp_reads(tmp_path, adapter, lft_tiny_model):
    info = export(str(adapter), tmp_path / "m.gguf", "f16")
    reader = gguf.GGUFReader(info["output"])
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.tokens")}
    tokenizer = lft.load(str(lft_tiny_model)).tokenizer
    assert fields["general.architecture"] == "llama" and fields["tokenizer.ggml.model"] == "gpt2"
    assert fields["tokenizer.chat_template"] == tokenizer.chat_template
    assert fields["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    assert fields["llama.block_count"] == 2 and fields["llama.attention.head_count_kv"] == 2
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokens[end] == "<|im_end|>" and types[end] == gguf.TokenType.CONTROL
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    assert kinds["blk.0.attn_q.weight"] == "F16" and kinds["blk.0.attn_norm.weight"] == "F32"
    assert "output.weight" not in kinds  # the head is tied to the embeddings
    assert info["kl_mean"] < 1e-4 and info["greedy_agreement"] > 0.9


def test_q8_0_is_half_the_size_of_f16_and_within_its_tolerance(tmp_path, adapter):
    f16 = export(str(adapter), tmp_path / "a.gguf", "f16")
    q8 = export(str(adapter), tmp_path / "b.gguf", "q8_0")
    # 64-wide rows: 2 bytes a value against 34 bytes per 32 values
    weights = gguf.GGUFReader(q8["output"]).tensors
    assert {t.tensor_type.name for t in weights if len(t.shape) == 2} == {"Q8_0"}
    assert q8["bytes"] < 0.7 * f16["bytes"]
    assert q8["kl_mean"] <= q8["tolerance"]["kl_mean"] and q8["kl_mean"] > f16["kl_mean"]


def test_a_failed_check_is_an_error_and_keeps_no_file(tmp_path, monkeypatch, adapter):
    monkeypatch.setitem(export_module.TOLERANCE, "q8_0", (1e-9, 1e-9))  # stricter than q8_0 can be
    out = tmp_path / "strict.gguf"
    with pytest.raises(ModelError, match="does not match the source .*the file was not kept"):
        export(str(adapter), out, "q8_0")
    assert list(tmp_path.iterdir()) == []


def test_the_modelfile_translates_chatml_and_keeps_the_default_system(tmp_path, adapter, lft_tiny_model):
    info = export(str(adapter), tmp_path / "m.gguf", "f16")
    text = (tmp_path / "Modelfile").read_text()
    assert text.startswith("FROM ./m.gguf\n") and 'PARAMETER stop "<|im_end|>"' in text
    assert "{{ range .Messages }}<|im_start|>{{ .Role }}" in text and info["template"].startswith("ChatML")
    tokenizer = lft.load(str(lft_tiny_model)).tokenizer
    talk = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Yes."},
        {"role": "user", "content": "?"},
    ]
    system = json.loads(text.split("SYSTEM ", 1)[1].splitlines()[0]) if "SYSTEM " in text else None
    assert render_chatml(talk, system) == tokenizer.apply_chat_template(
        talk, tokenize=False, add_generation_prompt=True
    )


def test_bad_requests_are_one_line_errors(tmp_path, capsys, adapter):
    for argv, expected in (
        (["export", str(adapter), "-o", str(tmp_path / "x.bin")], "must end in .gguf"),
        (["export", str(tmp_path / "missing"), "-o", str(tmp_path / "x.gguf")], "missing"),
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert expected in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err

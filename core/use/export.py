"""``lft export``: a model or an adapter as one GGUF file for llama.cpp and Ollama, checked.

* An adapter is merged into its base first (``lft merge``'s code); a GGUF source is read through
  transformers, as every lft command reads one.
* The file is written with the maintained ``gguf`` package: the architecture's hyperparameters,
  the tokenizer as llama.cpp reads it (byte-level BPE: tokens, token types, merges, special token
  ids, the chat template) and the weights in ``f32``, ``f16`` or ``q8_0`` (norms stay float32;
  a weight whose rows do not split into 32-value blocks stays f16 under q8_0).
* The output checks itself before it is kept: transformers reads the file back, its tokenizer
  must encode the check prompts to the same ids, and its next-token distributions on them must
  equal the source model's within the format's tolerance (KL per token, on average and at most). A failed
  check is an error and the file is not kept.
* An Ollama ``Modelfile`` goes beside it, with the chat template translated to Ollama's template
  language where it is a known family (ChatML, Llama 3), checked by rendering one conversation both
  ways; otherwise Ollama reads the template the GGUF file carries.

Supported architectures: Llama-style decoders (``llama``, ``mistral`` without sliding windows):
the SmolLM2 family, Llama 2 and 3, TinyLlama, Mistral 7B.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from lft.errors import ModelError

#: model_type -> the GGUF architecture llama.cpp runs it as.
ARCHITECTURES = {"llama": "llama", "mistral": "llama"}
OUTTYPES = ("f32", "f16", "q8_0")
#: The most KL(source || exported) per token allowed on the check prompts, in nats: the mean over
#: the positions and the largest at one position. Measured on SmolLM2-135M: f16 3.6e-6 mean and
#: 3.4e-5 at most; q8_0 2.7e-3 and 1.4e-2.
TOLERANCE = {"f32": (1e-6, 1e-5), "f16": (1e-4, 1e-3), "q8_0": (1e-2, 1e-1)}
CHECK_PROMPTS = (
    "What is 12 + 7?",
    "Write one sentence about the sea.",
    "Ana has 6 apples and eats 2. How many are left?",
)


def _gguf() -> Any:
    try:
        import gguf
    except ImportError:  # a dependency of lft; only a broken install lacks it
        raise ModelError("lft export needs the gguf package: pip install gguf") from None
    return gguf


def source_folder(source: str, model: str | None, work: Path) -> tuple[Path, str]:
    """A plain transformers folder for ``source``: an adapter merged into its base (into
    ``work``), a GGUF file converted, or the model folder itself; and what it was."""
    from lft.model import loading

    path = Path(source).expanduser()
    if path.is_dir() and (path / "adapter_config.json").is_file():
        from lft.use.loaded import merge

        merged = work / "merged"
        info = merge(str(path), merged, model=model, dtype="float32")
        return merged, f"{path} merged into {info['base']}"
    return Path(loading.local_folder(source)), str(source)


def permute_rotary(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorder the rows of a query or key projection from the half-split rotary layout of
    transformers' Llama to the interleaved pairs llama.cpp expects (transformers' GGUF reader
    undoes it). Each head's rows [a0..a(d/2-1), b0..b(d/2-1)] become [a0, b0, a1, b1, ...]."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def tokenizer_fields(tokenizer: Any, vocab_rows: int) -> dict:
    """The tokenizer as llama.cpp's gpt2 (byte-level BPE) tokenizer: tokens by id (padded to the
    embedding's rows), their types, the merges and the special token ids."""
    gguf = _gguf()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    state = json.loads(backend.to_str()) if backend is not None else {}
    bpe = state.get("model", {})
    pre = state.get("pre_tokenizer") or {}
    parts = [pre, *pre.get("pretokenizers", [])]  # one pre-tokenizer, or a sequence of them
    if bpe.get("type") != "BPE" or not any(part.get("type") == "ByteLevel" for part in parts):
        raise ModelError(
            "lft export writes byte-level BPE tokenizers (GPT-2 style: SmolLM2, Llama 3, Qwen); this "
            "model's tokenizer is not one"
        )
    vocab = tokenizer.get_vocab()
    size = max(vocab_rows, max(vocab.values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [gguf.TokenType.USER_DEFINED] * size
    for token, index in vocab.items():
        tokens[index], types[index] = token, gguf.TokenType.NORMAL
    for index, added in tokenizer.added_tokens_decoder.items():
        types[index] = gguf.TokenType.CONTROL if added.special else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in bpe.get("merges", [])]
    return {"tokens": tokens, "types": types, "merges": merges}


def write(model: Any, tokenizer: Any, path: Path, outtype: str, name: str, pre: str = "default") -> dict:
    """Write ``model`` (a Llama-style transformers model in float32) and ``tokenizer`` as GGUF."""
    gguf = _gguf()
    cfg = model.config
    arch = ARCHITECTURES.get(cfg.model_type)
    if arch is None or getattr(cfg, "sliding_window", None):
        raise ModelError(
            f"lft export writes Llama-style models ({', '.join(ARCHITECTURES)} without sliding windows); "
            f"this one is {cfg.model_type!r}"
        )
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if rope.get("rope_type", "default") not in ("default", None):
        raise ModelError(f"lft export does not write {rope['rope_type']!r} rotary scaling yet")
    theta = rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    file_type = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(name)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(theta))
    writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    writer.add_vocab_size(model.get_input_embeddings().weight.shape[0])
    writer.add_file_type(file_type[outtype])

    fields = tokenizer_fields(tokenizer, model.get_input_embeddings().weight.shape[0])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(fields["tokens"])
    writer.add_token_types(fields["types"])
    writer.add_token_merges(fields["merges"])
    for kind, token in (
        ("bos", tokenizer.bos_token_id),
        ("eos", tokenizer.eos_token_id),
        ("pad", tokenizer.pad_token_id),
    ):
        if token is not None:
            getattr(writer, f"add_{kind}_token_id")(int(token))
    writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    kinds: dict[str, int] = {}
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp reads the embeddings as the head when there is no output.weight
        base, _, suffix = hf_name.rpartition(".")
        mapped = names.get_name(base)
        if mapped is None or "rotary_emb" in base:
            if "rotary_emb" in base:
                continue
            raise ModelError(f"lft export: no GGUF name for the weight {hf_name}")
        weight = tensor.detach().float()
        if mapped.endswith("attn_q"):
            weight = permute_rotary(weight, heads)
        elif mapped.endswith("attn_k"):
            weight = permute_rotary(weight, kv_heads)
        data = weight.numpy()
        qtype = gguf.GGMLQuantizationType.F32
        if data.ndim == 2 and outtype != "f32":
            qtype = gguf.GGMLQuantizationType.F16
            if outtype == "q8_0" and data.shape[-1] % 32 == 0:
                qtype = gguf.GGMLQuantizationType.Q8_0
        stored = gguf.quants.quantize(data, qtype) if qtype != gguf.GGMLQuantizationType.F32 else data
        writer.add_tensor(f"{mapped}.{suffix}", stored, raw_dtype=qtype)
        kinds[qtype.name] = kinds.get(qtype.name, 0) + 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"tensors": kinds}


def check(model: Any, tokenizer: Any, path: Path, outtype: str) -> dict:
    """Read ``path`` back with transformers and compare it with ``model``: the tokenizer's ids
    and, on each check prompt, the logits (relative to their spread) and the greedy tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lft.data import chat

    try:
        back_tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        back = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    except Exception as exc:
        raise ModelError(f"{path}: transformers could not read the file back ({str(exc).splitlines()[0]})") from None
    kls, worst, agree, positions = [], 0.0, 0, 0
    for prompt in CHECK_PROMPTS:
        text = chat.prompt_text(tokenizer, prompt) if tokenizer.chat_template else prompt
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        back_ids = back_tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        if not torch.equal(ids, back_ids):
            raise ModelError(f"{path}: its tokenizer encodes {prompt!r} differently from the model's")
        with torch.no_grad():
            want, got = model(ids).logits[0].float(), back(ids).logits[0].float()
        source, exported = want.log_softmax(-1), got.log_softmax(-1)
        kls.append((source.exp() * (source - exported)).sum(-1))
        worst = max(worst, float(((got - want).abs() / want.std(-1, keepdim=True).clamp(min=1e-6)).max()))
        agree += int((got.argmax(-1) == want.argmax(-1)).sum())
        positions += ids.shape[1]
    kl = torch.cat(kls)
    mean_limit, max_limit = TOLERANCE[outtype]
    kl_mean, kl_max = float(kl.mean()), float(kl.max())
    result: dict[str, Any] = {
        "kl_mean": kl_mean,
        "kl_max": kl_max,
        "max_logit_diff": worst,  # relative to the logits' spread
        "greedy_agreement": agree / positions,
        "tolerance": {"kl_mean": mean_limit, "kl_max": max_limit},
    }
    if kl_mean > mean_limit or kl_max > max_limit:
        raise ModelError(
            f"{path}: the exported model does not match the source ({outtype}: KL per token {kl_mean:.2g} "
            f"on average and {kl_max:.2g} at most, tolerance {mean_limit:g} and {max_limit:g}); the file "
            "was not kept"
        )
    return result


# -- Ollama ----------------------------------------------------------------------------------------

#: ChatML in Ollama's template language (Go text/template). Ollama passes every message, a system
#: one included, in ``.Messages``; the Modelfile's SYSTEM becomes a first system message when the
#: conversation has none.
CHATML = "{{ range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"


def render_chatml(messages: list[dict], system: str | None) -> str:
    """What Ollama renders from ``CHATML`` for ``messages`` with the Modelfile's SYSTEM
    ``system``, to compare with the model's own template."""
    if system and not (messages and messages[0]["role"] == "system"):
        messages = [{"role": "system", "content": system}, *messages]
    body = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return body + "<|im_start|>assistant\n"


def default_system(tokenizer: Any) -> str | None:
    """The system message the chat template adds when a conversation has none (SmolLM2 adds one)."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
    start = "<|im_start|>system\n"
    return text[len(start) : text.index("<|im_end|>")] if text.startswith(start) else None


def modelfile(tokenizer: Any, gguf_name: str) -> tuple[str, str]:
    """An Ollama Modelfile for the exported file, and how its template was made."""
    lines = [f"FROM ./{gguf_name}"]
    template = tokenizer.chat_template or ""
    if "<|im_start|>" not in template:
        lines.insert(0, "# The chat template is not a family lft translates; Ollama reads the one in the GGUF file.")
        return "\n".join(lines) + "\n", "the GGUF file's own (not translated)"
    system = default_system(tokenizer)
    talk = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "What is 2 + 3?"},
    ]
    for conversation in (talk, [{"role": "system", "content": "Be brief."}] + talk):
        want = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        if render_chatml(conversation, system) != want:
            lines.insert(0, "# The chat template did not translate exactly; Ollama reads the one in the GGUF file.")
            return "\n".join(lines) + "\n", "the GGUF file's own (translation did not match)"
    lines.append(f'TEMPLATE """{CHATML}"""')
    if system:
        lines.append(f"SYSTEM {json.dumps(system)}")
    lines.append('PARAMETER stop "<|im_end|>"')
    return "\n".join(lines) + "\n", "ChatML, checked against the model's template on two conversations"


# -- the command ----------------------------------------------------------------------------------


def pre_tokenizer(source: str, folder: Path) -> str:
    """llama.cpp's name for the pre-tokenizer, taken from a GGUF file the model came from (the
    source, or an adapter's base); ``default`` otherwise."""
    from lft.model import loading

    candidates = [source]
    config = Path(source) / "adapter_config.json"
    if config.is_file():
        candidates.append(json.loads(config.read_text()).get("base_model_name_or_path"))
    for candidate in candidates:
        try:
            where, gguf_file = loading.resolve(candidate)
        except Exception:
            continue
        if gguf_file:
            reader = _gguf().GGUFReader(str(Path(where) / gguf_file))
            field = reader.fields.get("tokenizer.ggml.pre")
            if field is not None:
                return str(field.contents())
        cached = Path(where) / "lft-gguf-source.json"
        if cached.is_file():
            return json.loads(cached.read_text()).get("pre", "default")
    return "default"


def export(source: str, out: str | Path, outtype: str = "f16", model: str | None = None) -> dict:
    """Export ``source`` (a model, a GGUF file or an adapter) as a checked GGUF file at ``out``,
    with an Ollama Modelfile beside it. Returns what was written and the check's numbers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lft.output.files import atomic_write_text

    if outtype not in OUTTYPES:
        raise ModelError(f"--outtype {outtype}: expected one of {', '.join(OUTTYPES)}")
    out = Path(out).expanduser()
    if out.suffix.lower() != ".gguf":
        raise ModelError(f"{out}: the output file must end in .gguf")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="lft-export-") as work:
        folder, described = source_folder(source, model, Path(work))
        tokenizer = AutoTokenizer.from_pretrained(folder)
        hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        tmp = out.with_name(f".{out.name}.tmp")
        try:
            written = write(hf, tokenizer, tmp, outtype, out.stem, pre_tokenizer(source, folder))
            checked = check(hf, tokenizer, tmp, outtype)
            os.replace(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)
    text, template = modelfile(tokenizer, out.name)
    modelfile_path = out.with_name("Modelfile")
    atomic_write_text(modelfile_path, text, "Modelfile")
    return {
        "output": str(out),
        "source": described,
        "outtype": outtype,
        "bytes": out.stat().st_size,
        "modelfile": str(modelfile_path),
        "template": template,
        **written,
        **checked,
    }

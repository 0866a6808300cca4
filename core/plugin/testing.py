"""Test helpers for lft and for plugin authors, registered as a pytest plugin (``pytest11``).

Fixtures:

* ``lft_tiny_model``: the path of a tiny random Llama model folder with a tokenizer built here
  (byte-level BPE trained on the embedded task's text) and a ChatML chat template;
* ``lft_sft_data``, ``lft_pref_data``, ``lft_prompt_data``: small JSONL files (train, eval) in
  the three data formats, from the embedded task;
* ``lft_run``: runs ``lft run`` through the real command line in a temporary folder and returns
  the run's ``summary.json`` plus its output folder.

Nothing is downloaded; the model and tokenizer are built in seconds and cached per session.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import pytest

CHATML = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a tiny test model.<|im_end|>\n' }}{% endif %}"  # noqa: E501
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def build_tokenizer(vocab_size: int = 384) -> Any:
    """A byte-level BPE tokenizer trained on the embedded task's text, with ChatML specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from lft.data import task

    texts = []
    for split in ("train", "eval"):
        for line in task.path("sft", split).read_text(encoding="utf-8").splitlines():
            for message in json.loads(line)["messages"]:
                texts.append(message["content"])
    texts += ["You are a tiny test model.", "system user assistant"] * 20
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token="<|im_start|>",
        unk_token=None,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHATML
    return tokenizer


def build_model(tokenizer: Any, seed: int = 0, hidden: int = 64, layers: int = 2) -> Any:
    """A tiny random Llama causal LM sized for ``tokenizer``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        initializer_range=0.2,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    return LlamaForCausalLM(config)


def save_tiny_model(directory: Path, seed: int = 0, **sizes: Any) -> Path:
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, seed=seed, **sizes)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def likeliest_first_token(model_dir: Path, prompt_file: Path) -> int:
    """The token a model finds most likely, on average, to start its answer to the prompts of a
    prompt/answer JSONL file: a reward that counts it gives an online method a signal at once."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lft.data import chat

    model, tokenizer = AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)
    rows = [json.loads(line) for line in prompt_file.read_text().splitlines()]
    tokenizer.padding_side = "left"
    texts = [chat.prompt_text(tokenizer, r["prompt"]) for r in rows]
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        return int(model(**enc).logits[:, -1].softmax(-1).mean(0).argmax())


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def task_subset(form: str, directory: Path, n_train: int = 64, n_eval: int = 16) -> dict[str, Path]:
    """The first rows of the embedded task in one form, written to ``directory``."""
    from lft.data import task

    out = {}
    for split, n in (("train", n_train), ("eval", n_eval)):
        lines = task.path(form, split).read_text(encoding="utf-8").splitlines()[:n]
        out[split] = write_jsonl(directory / f"{form}-{split}.jsonl", [json.loads(x) for x in lines])
    return out


@pytest.fixture(scope="session")
def lft_tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path of a tiny random Llama model folder (with tokenizer and chat template)."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def lft_sft_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return task_subset("sft", tmp_path_factory.mktemp("sft-data"))


@pytest.fixture(scope="session")
def lft_pref_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return task_subset("pref", tmp_path_factory.mktemp("pref-data"))


@pytest.fixture(scope="session")
def lft_prompt_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return task_subset("prompts", tmp_path_factory.mktemp("prompt-data"))


#: Settings that make a run on the tiny model quick and deterministic.
FAST = [
    "trainer.precision=32-true",
    "trainer.checkpoint_every=0",
    "eval.task=none",
    "eval.before=false",
    "data.max_eval_rows=16",
    "guards.repetition.samples=4",
    "guards.repetition.max_new_tokens=16",
    "guards.forgetting.samples=4",
    "guards.forgetting.max_new_tokens=16",
    "guards.forgetting.everyday=4",
    "guards.forgetting.conversations=2",
    "guards.forgetting.answer_tokens=16",
]


@pytest.fixture
def lft_run(tmp_path: Path, lft_tiny_model: Path, lft_sft_data: dict) -> Callable[..., dict]:
    """Run ``lft run`` through the real CLI and return its summary (with ``output`` as a Path).

    ``lft_run("--plugin", "lora", "trainer.max_steps=5", data=path)`` uses the tiny model and
    the tiny SFT data unless given others; with ``data`` and no ``eval_data``, a held-out split
    is carved from ``data`` (``eval_data=False`` too). Raises AssertionError with the exit code when the
    command fails.
    """
    from lft.cli.main import main

    counter = {"n": 0}

    def run(
        *args: str, data: Any = None, eval_data: Any = None, model: Any = None, output: Any = None, fast: bool = True
    ) -> dict:
        counter["n"] += 1
        out = Path(output) if output else tmp_path / f"run{counter['n']}"
        argv = [
            "run",
            "--quiet",
            "--model",
            str(model or lft_tiny_model),
            "--output",
            str(out),
            "--data",
            str(data or lft_sft_data["train"]),
        ]
        if eval_data is None and data is None:
            eval_data = lft_sft_data["eval"]
        if eval_data:
            argv += ["--eval-data", str(eval_data)]
        argv += list(FAST if fast else []) + list(args)
        code = main(argv)
        assert code == 0, f"lft {' '.join(argv)} exited with {code}"
        summary = json.loads((out / "summary.json").read_text())
        summary["output"] = out
        return summary

    return run


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def install_fake_distribution(
    root: Path, name: str, entry_points: dict[str, str], modules: dict[str, str] | None = None, version: str = "1.0"
) -> Path:
    """Make a distribution visible to ``importlib.metadata`` without pip: writes
    ``NAME-VERSION.dist-info`` (with ``[lft]`` entry points) and the given module sources into
    ``root``. Put ``root`` on ``sys.path`` (pytest's ``monkeypatch.syspath_prepend``) to install it.
    """
    root.mkdir(parents=True, exist_ok=True)
    dist = root / f"{name.replace('-', '_')}-{version}.dist-info"
    dist.mkdir(exist_ok=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n", encoding="utf-8")
    lines = ["[lft]"] + [f"{key} = {value}" for key, value in entry_points.items()]
    (dist / "entry_points.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    for module, source in (modules or {}).items():
        (root / f"{module}.py").write_text(source, encoding="utf-8")
    return root

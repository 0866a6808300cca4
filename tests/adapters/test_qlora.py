"""QLoRA: a 4-bit base with LoRA on top trains, survives validation passes, merges and reloads."""

import json

import pytest
import torch

import lft
from lft.adapters import quantize
from lft.cli.main import main
from lft.plugin.testing import FAST
from lft.plugins.sft import SFTObjective


class Inspect:
    """Records, when training starts, what the model's layers are and which weights train."""

    name = "inspect"

    def __init__(self):
        self.seen = {}

    @lft.hookimpl
    def lft_callbacks(self, config):
        import bitsandbytes as bnb
        import lightning as L

        seen = self.seen

        class Look(L.Callback):
            def on_train_start(self, trainer, pl_module):
                model = pl_module.model
                seen["4bit"] = [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
                seen["linear"] = [n for n, m in model.named_modules() if type(m) is torch.nn.Linear]
                seen["trainable"] = [n for n, p in model.named_parameters() if p.requires_grad]
                seen["guarded"] = all(
                    not m.support_avx512bf16_for_cpu for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)
                )

        return [Look()]


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory, lft_tiny_model, lft_sft_data):
    inspect = Inspect()
    config = {
        "model.path": str(lft_tiny_model),
        "data.train": str(lft_sft_data["train"]),
        "data.eval": str(lft_sft_data["eval"]),
        "output": str(tmp_path_factory.mktemp("qlora") / "out"),
        "plugins": ["qlora"],
        "trainer.max_steps": 20,
        "trainer.lr": 1e-2,
        "qlora.r": 8,
        "eval.before": True,
    }
    for item in FAST[:3]:
        key, value = item.split("=")
        config.setdefault(key, {"true": True, "false": False, "none": None}.get(value, value))
    result = lft.run(config, plugins=[inspect], quiet=True)
    return result, inspect.seen


def test_qlora_trains_lora_on_a_4bit_base(qlora_run, lft_tiny_model):
    from transformers import AutoModelForCausalLM

    result, seen = qlora_run
    losses = [h["loss"] for h in result.history]
    assert len(losses) == 20 and sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3, losses
    assert result.metrics["after"]["eval_loss"] < result.metrics["before"]["eval_loss"]
    # every projection of every block is 4-bit; only the output head (tied to the embedding) is not
    assert len(seen["4bit"]) == 2 * 7 and all(".base_layer" in n for n in seen["4bit"] if "attn" in n)
    assert [n.split(".")[-1] for n in seen["linear"] if "lora" not in n] == ["lm_head"]
    assert seen["trainable"] and all(".lora_A." in n or ".lora_B." in n for n in seen["trainable"])
    assert seen["guarded"]
    assert result.metrics["wrapper"] == "qlora" and (result.final / "adapter_model.safetensors").is_file()
    full = AutoModelForCausalLM.from_pretrained(lft_tiny_model).num_parameters()
    assert (
        result.metrics["total_params"] == full + result.metrics["trainable_params"]
    )  # 4-bit weights counted as weights


def test_lft_eval_reloads_the_4bit_base_and_agrees_with_the_run(tmp_path, qlora_run, lft_sft_data, lft_tiny_model):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    result, _ = qlora_run
    loaded = lft.load(adapters=result.final)
    assert loaded.quantization == "4-bit nf4" and quantize.count_quantized(loaded.model, 4) == 14
    got = loaded.evaluate(data=lft_sft_data["eval"])
    assert got["eval_loss"] == pytest.approx(result.metrics["after"]["eval_loss"], rel=1e-5)

    plain = get_peft_model(AutoModelForCausalLM.from_pretrained(lft_tiny_model), LoraConfig(target_modules=["q_proj"]))
    plain.save_pretrained(tmp_path / "plain")
    with pytest.warns(
        UserWarning,
        match="adapter plain was trained on a full-precision base but shares the 4-bit nf4 base loaded for q",
    ):
        both = lft.load(adapters={"q": result.final, "plain": tmp_path / "plain"})
    assert len(both.notes) == 1


def test_qlora_merges_into_a_full_precision_copy_of_the_base(tmp_path, capsys, qlora_run, lft_tiny_model):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    result, _ = qlora_run
    out = tmp_path / "merged"
    assert main(["merge", str(result.final), "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert "trained on a 4-bit nf4 base; merged into a full-precision copy of" in err
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert quantize.count_quantized(merged, 4) == 0 and not hasattr(merged.config, "quantization_config")
    base = AutoModelForCausalLM.from_pretrained(lft_tiny_model).eval()
    reference = PeftModel.from_pretrained(base, str(result.final)).eval()
    ids = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 11]])
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, reference(input_ids=ids).logits, atol=1e-5)


def qlora_model(tiny, seed=0, **options):
    """The qlora plugin's load and wrap hooks, as a run calls them; LoRA B made non-zero so that
    every adapter weight gets a gradient."""
    from lft.plugin.manager import PluginManager
    from lft.train.engine import resolve

    resolved = resolve(
        {"model": {"path": str(tiny)}, "plugins": ["qlora"], "trainer": {"precision": "32-true"}, "qlora": options},
        PluginManager(),
    )
    config, hook = resolved.config, resolved.selection.hook
    model, tokenizer = hook.lft_load_model(
        config=config, quantization_config=hook.lft_quantization_config(config=config)
    )
    torch.manual_seed(seed)
    wrapped = hook.lft_wrap_model(model=model, config=config, objective=SFTObjective())
    for name, param in wrapped.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    return wrapped, tokenizer, config, hook


def lora_grads(module, batch):
    module.model.zero_grad()
    loss, _ = module.compute(batch)
    loss.backward()
    return {n: p.grad for n, p in module.model.named_parameters() if p.requires_grad}


def grads_after_validation(tiny, batch, validate, avx512bf16_cpu=True):
    """LoRA gradients of one training step, after a Lightning validation pass or not, on a CPU
    that (as simulated here) reports AVX512-BF16 when the 4-bit layers are built."""
    import bitsandbytes as bnb
    import lightning as L

    from lft.train.module import LftModule

    patch = pytest.MonkeyPatch()
    patch.setattr(bnb.nn.modules, "has_avx512bf16", lambda: avx512bf16_cpu)
    try:
        model, tokenizer, config, hook = qlora_model(tiny)
    finally:
        patch.undo()
    module = LftModule(model, tokenizer, SFTObjective(), hook, config)
    if validate:
        trainer = L.Trainer(
            accelerator="cpu",
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
        )
        trainer.validate(module, dataloaders=torch.utils.data.DataLoader([batch], batch_size=None), verbose=False)
    module.model.train()
    return lora_grads(module, batch)


@pytest.fixture
def sft_batch(lft_tiny_model, lft_sft_data):
    from transformers import AutoTokenizer

    from lft.data import chat
    from lft.data.format import pad_collate

    tokenizer = AutoTokenizer.from_pretrained(lft_tiny_model)
    rows = [json.loads(line) for line in open(lft_sft_data["eval"])][:4]
    features = [dict(zip(("input_ids", "labels"), chat.tokenize_conversation(tokenizer, r["messages"]))) for r in rows]
    return pad_collate(features, tokenizer.pad_token_id)


@pytest.mark.filterwarnings(
    "ignore:.*an autograd kernel was not registered"
)  # the unguarded control backprops through it
def test_lora_gradients_after_a_validation_pass_equal_those_without(lft_tiny_model, sft_batch, monkeypatch):
    never = grads_after_validation(lft_tiny_model, sft_batch, validate=False)
    after = grads_after_validation(lft_tiny_model, sft_batch, validate=True)
    assert set(after) == set(never) and len(never) == 2 * 4 * 2  # layers x q,k,v,o x A,B
    for name, grad in never.items():
        assert grad is not None and grad.abs().sum() > 0, name
        assert after[name] is not None and torch.allclose(after[name], grad, atol=1e-6), name

    # The same check without lft's guard fails: the trap is real, and this test would see it.
    monkeypatch.setattr(quantize, "guard_cpu_repack", lambda model: 0)
    broken = grads_after_validation(lft_tiny_model, sft_batch, validate=True)
    assert any(broken[n] is None or not torch.allclose(broken[n], g, atol=1e-6) for n, g in never.items())


def test_8bit_and_compute_dtype_options(lft_tiny_model, sft_batch):
    import bitsandbytes as bnb

    from lft.plugins.qlora import QLoRA
    from lft.train.module import LftModule

    model, tokenizer, config, hook = qlora_model(lft_tiny_model, bits=8)
    assert quantize.count_quantized(model, 8) == 14 and quantize.count_quantized(model, 4) == 0
    grads = lora_grads(LftModule(model, tokenizer, SFTObjective(), hook, config), sft_batch)
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())
    assert all(isinstance(m.base_layer, bnb.nn.Linear8bitLt) for n, m in model.named_modules() if n.endswith("q_proj"))

    config.qlora.bits, config.qlora.compute_dtype, config.qlora.double_quant = 4, "bfloat16", False
    qc = QLoRA().quantization(config)
    assert qc.load_in_4bit and qc.bnb_4bit_compute_dtype == torch.bfloat16 and not qc.bnb_4bit_use_double_quant
    config.qlora.compute_dtype = "auto"
    assert QLoRA().quantization(config).bnb_4bit_compute_dtype == torch.float32  # a 32-true run


def save_unquantizable_model(directory):
    """A tiny causal LM of a custom type whose projections subclass nn.Linear, which bitsandbytes'
    replacement (exact nn.Linear only) leaves alone: nothing in it can be quantized."""
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoTokenizer,
        GenerationMixin,
        PretrainedConfig,
        PreTrainedModel,
    )
    from transformers.modeling_outputs import CausalLMOutput

    class Projection(torch.nn.Linear):
        pass

    class PlainConfig(PretrainedConfig):
        model_type = "lft_plain_test"

        def __init__(self, vocab_size=384, hidden_size=32, **kwargs):
            self.vocab_size, self.hidden_size = vocab_size, hidden_size
            super().__init__(**kwargs)

    class PlainLM(PreTrainedModel, GenerationMixin):
        config_class = PlainConfig

        def __init__(self, config):
            super().__init__(config)
            self.embed = torch.nn.Embedding(config.vocab_size, config.hidden_size)
            self.q_proj = Projection(config.hidden_size, config.hidden_size)
            self.head = Projection(config.hidden_size, config.vocab_size)
            self.post_init()

        def get_input_embeddings(self):
            return self.embed

        def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
            return CausalLMOutput(logits=self.head(torch.tanh(self.q_proj(self.embed(input_ids)))))

    try:
        AutoConfig.register("lft_plain_test", PlainConfig)
        AutoModelForCausalLM.register(PlainConfig, PlainLM)
    except ValueError:
        pass  # registered by an earlier call in this process
    from lft.plugin.testing import build_tokenizer

    PlainLM(PlainConfig()).save_pretrained(directory)
    build_tokenizer().save_pretrained(directory)
    assert AutoTokenizer.from_pretrained(directory)
    return directory


def test_4bit_request_on_a_model_that_cannot_be_quantized_is_one_line(tmp_path, capsys, lft_sft_data):
    model = save_unquantizable_model(tmp_path / "plain")
    capsys.readouterr()
    argv = [
        "run",
        "-q",
        "--model",
        str(model),
        "--data",
        str(lft_sft_data["train"]),
        "--output",
        str(tmp_path / "o"),
        "--plugin",
        "qlora",
        "qlora.target_modules=[q_proj]",
        *FAST,
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"{model}: model type 'lft_plain_test' cannot be quantized to 4-bit" in err
    assert "train it with --plugin lora instead" in err

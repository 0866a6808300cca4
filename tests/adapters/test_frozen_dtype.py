"""Under bf16 autocast the frozen base of a LoRA model is stored in bf16: the maths is unchanged
(autocast casts float32 weights to bf16 for every matmul anyway), the memory of the base halves,
and the model still runs without autocast (generation, evaluation)."""

import copy

import pytest
import torch

from lft.adapters.lora import FrozenLowPrecisionLinear, apply_lora, store_frozen_linears
from lft.plugin.testing import build_model, build_tokenizer


@pytest.fixture(scope="module")
def pair():
    tokenizer = build_tokenizer()
    base = build_model(tokenizer, seed=3)
    plain = apply_lora(base, r=4, alpha=8, dropout=0.0, targets="attention")
    with torch.no_grad():  # LoRA B starts at zero; give it values so the adapters take part
        for name, param in plain.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    stored = copy.deepcopy(plain)
    converted = store_frozen_linears(stored, torch.bfloat16)
    return tokenizer, plain, stored, converted


def batch(tokenizer):
    ids = torch.tensor([tokenizer("Tom has 3 apples and gets 4 more.")["input_ids"]] * 2)
    return ids, torch.ones_like(ids)


def test_which_layers_are_converted(pair):
    _, plain, stored, converted = pair
    linears = [m for m in stored.modules() if isinstance(m, FrozenLowPrecisionLinear)]
    # every frozen projection of the layers: q, k, v, o (the LoRA base layers), gate, up, down
    assert len(linears) == 2 * 7 and all(m.weight.dtype == torch.bfloat16 for m in linears)
    assert converted == sum(m.weight.numel() for m in linears)
    assert stored.get_output_embeddings().weight.dtype == torch.float32  # tied to the input embeddings
    assert all(p.dtype == torch.float32 for n, p in stored.named_parameters() if "lora_" in n)
    assert all(p.requires_grad == ("lora_" in n) for n, p in stored.named_parameters())


def test_bf16_autocast_maths_is_unchanged(pair):
    tokenizer, plain, stored, _ = pair
    ids, mask = batch(tokenizer)
    results = []
    for model in (plain, stored):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(input_ids=ids, attention_mask=mask).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((logits.float(), loss.detach(), grads))
    (l1, loss1, g1), (l2, loss2, g2) = results
    assert torch.equal(l1, l2) and torch.equal(loss1, loss2)
    assert g1.keys() == g2.keys() and all(torch.equal(g1[n], g2[n]) for n in g1)


def test_runs_without_autocast(pair):
    tokenizer, plain, stored, _ = pair
    ids, mask = batch(tokenizer)
    with torch.no_grad():
        out = stored(input_ids=ids, attention_mask=mask).logits
        reference = plain(input_ids=ids, attention_mask=mask).logits
    assert out.dtype == torch.float32
    # bf16 matmuls against float32 ones: close (bf16 keeps 8 bits of mantissa), not equal
    assert 0 < float((out - reference).norm() / reference.norm()) < 0.05
    generated = stored.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert generated.shape == (2, ids.shape[1] + 4)


def test_the_lora_plugin_stores_the_base_in_bf16_only_under_bf16_mixed(lft_tiny_model):
    import lft
    from lft.model.loading import load_model
    from lft.plugins.lora import LoRA

    for precision, dtype in (("bf16-mixed", torch.bfloat16), ("32-true", torch.float32)):
        for choice in ("auto", "float32"):
            config = lft.load_config(
                overrides=[
                    f"model.path={lft_tiny_model}",
                    f"trainer.precision={precision}",
                    f"lora.frozen_dtype={choice}",
                ]
            )
            model, _ = load_model(config)
            wrapped = LoRA().wrap(model, config)
            q = wrapped.get_base_model().model.layers[0].self_attn.q_proj.base_layer
            assert q.weight.dtype == (dtype if choice == "auto" else torch.float32), (precision, choice)


def test_bf16_runs_end_to_end_with_a_bf16_base(lft_run, lft_prompt_data):
    """Training, the before/after measurements (loss, task generation), the guards and the saved
    adapter all work with the base stored in bf16."""
    summary = lft_run(
        "--plugin",
        "lora",
        "trainer.precision=bf16-mixed",
        "trainer.max_steps=4",
        "trainer.lr=1e-2",
        "eval.before=true",
        "eval.task=arith",
        "eval.task_samples=4",
        "eval.max_new_tokens=8",
    )
    assert summary["before"]["eval_loss"] > summary["after"]["eval_loss"]
    assert "task_accuracy" in summary["after"] and (summary["output"] / "final" / "adapter_model.safetensors").is_file()
    from safetensors.torch import load_file

    assert all(
        t.dtype == torch.float32 for t in load_file(summary["output"] / "final" / "adapter_model.safetensors").values()
    )
    online = lft_run(
        "--plugin",
        "grpo",
        "--plugin",
        "exact_answer",
        "trainer.precision=bf16-mixed",
        "trainer.max_steps=2",
        "trainer.batch_size=2",
        "grpo.num_generations=2",
        "grpo.max_new_tokens=4",
        "trainer.eval_every=0",
        data=lft_prompt_data["train"],
        eval_data=lft_prompt_data["eval"],
    )
    assert online["steps"] == 2

"""Packing (lft.data.packing): packed and padding-free batches train exactly what the same examples
unpacked train. The loss and every gradient are equal within float tolerance, so no example
attends to another and none is trained across a boundary."""

import json
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import lft
from lft.cli.main import main
from lft.data.format import pad_collate
from lft.data.packing import bins, concatenate, pack
from lft.losses.logprobs import IGNORE_INDEX
from lft.model.attention import use_segment_attention
from lft.plugin.testing import FAST
from lft.plugins.sft import SFTObjective
from lft.train.engine import resolve


def test_best_fit_decreasing_by_hand():
    # longest first: 6 opens bin 0 (2 left), 5 bin 1 (3 left), 4 bin 2 (4 left); 3 fits bins 1 and 2,
    # best in bin 1 (0 left); 2 fits bins 0 and 2, best in bin 0 (0 left)
    assert bins([5, 3, 4, 2, 6], 8) == [[3, 4], [0, 1], [2]]
    assert bins([4, 4, 4], 8) == [[0, 1], [2]]
    with pytest.raises(lft.ConfigError, match="9 tokens is longer than data.max_length=8"):
        bins([9], 8)


def test_a_packed_row_restarts_positions_and_masks_each_first_label():
    row = concatenate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8, 9], "labels": [8, 9]}])
    assert row == {
        "input_ids": [5, 6, 7, 8, 9],
        "labels": [IGNORE_INDEX, 6, 7, IGNORE_INDEX, 9],
        "position_ids": [0, 1, 2, 0, 1],
    }
    batch = pad_collate([row, concatenate([{"input_ids": [1, 2], "labels": [1, 2]}])], pad_id=0)
    # the padding is a block of its own, counted from 0, never a continuation of a real example
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]


@pytest.fixture
def sft_examples(lft_tiny_model, lft_sft_data):
    tokenizer = AutoTokenizer.from_pretrained(lft_tiny_model)
    resolved = resolve(
        {"model": {"path": str(lft_tiny_model)}, "data": {"train": str(lft_sft_data["train"])}},
        lft.plugin.manager.PluginManager(),
    )
    rows = [json.loads(line) for line in lft_sft_data["train"].read_text().splitlines()[:12]]
    hook = resolved.selection.hook
    features = [hook.lft_format_example(example=r, tokenizer=tokenizer, config=resolved.config) for r in rows]
    return [{k: f[k] for k in ("input_ids", "labels")} for f in features], tokenizer, resolved.config


def loss_and_grads(model, batch, config):
    model.zero_grad(set_to_none=True)
    objective = SFTObjective()
    loss, _ = objective(SimpleNamespace(model=model, config=config), batch)
    loss.backward()
    units = objective.units(batch)["tokens"]
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}, units


def tiny(path, attention):
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=attention.replace("lft_", "")).float()
    if attention == "lft_sdpa":  # lft.model.attention: causal SDPA per example, no block mask
        assert use_segment_attention(model)
    return model


@pytest.mark.parametrize("attention", ["sdpa", "eager", "lft_sdpa"])
def test_packed_and_padding_free_batches_equal_the_unpacked_one(sft_examples, lft_tiny_model, attention):
    features, tokenizer, config = sft_examples
    model = tiny(lft_tiny_model, attention)
    lengths = [len(f["input_ids"]) for f in features]
    rows, _ = pack(features, max(lengths) * 3)
    assert len(rows) < len(features)  # several examples per row
    loss, grads, units = loss_and_grads(model, pad_collate(features, tokenizer.pad_token_id), config)
    for batch in (pad_collate(rows, tokenizer.pad_token_id), pad_collate([concatenate(features)], 0)):
        packed_loss, packed_grads, packed_units = loss_and_grads(model, batch, config)
        assert packed_units == units  # the same trained tokens: none across a boundary
        torch.testing.assert_close(packed_loss, loss, rtol=1e-5, atol=1e-6)
        for name, grad in grads.items():
            torch.testing.assert_close(packed_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_segment_attention_is_sdpa_on_padded_batches_and_in_generation(sft_examples, lft_tiny_model):
    """Where a batch has an attention mask (padding, generation with a cache), ``lft_sdpa`` is
    transformers' SDPA itself: the same logits, bit for bit, and the same greedy tokens."""
    features, tokenizer, _ = sft_examples
    stock, segmented = tiny(lft_tiny_model, "sdpa").eval(), tiny(lft_tiny_model, "lft_sdpa").eval()
    batch = pad_collate(features[:4], tokenizer.pad_token_id)
    assert (batch["attention_mask"] == 0).any()  # padded
    with torch.no_grad():
        for inputs in ({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]},):
            assert torch.equal(stock(**inputs).logits, segmented(**inputs).logits)
        prompt = torch.tensor([features[0]["input_ids"][:8]])
        kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
        assert torch.equal(stock.generate(prompt, **kwargs), segmented.generate(prompt, **kwargs))


@pytest.mark.parametrize("attention", ["sdpa", "lft_sdpa"])
def test_a_row_attends_within_its_examples_only(sft_examples, lft_tiny_model, attention):
    """Changing one example of a packed row leaves the other's log-probs as they were."""
    features, tokenizer, config = sft_examples
    model = tiny(lft_tiny_model, attention).eval()
    first, second = features[0], features[1]
    other = {"input_ids": [tokenizer.eos_token_id] * len(first["input_ids"]), "labels": first["labels"]}
    from lft.model.forward import token_logprobs

    def second_logps(row):
        batch = pad_collate([row], tokenizer.pad_token_id)
        logps, _ = token_logprobs(model, batch["input_ids"], None, batch["labels"], position_ids=batch["position_ids"])
        return logps[0, len(first["input_ids"]) :]

    with torch.no_grad():
        torch.testing.assert_close(
            second_logps(concatenate([first, second])), second_logps(concatenate([other, second]))
        )


def test_a_packed_run_trains_and_says_how_it_packed(tmp_path, lft_tiny_model, lft_sft_data):
    out = tmp_path / "run"
    assert (
        main(
            [
                "run",
                "--model",
                str(lft_tiny_model),
                "--data",
                str(lft_sft_data["train"]),
                "--eval-data",
                str(lft_sft_data["eval"]),
                "--output",
                str(out),
                "data.packing=true",
                "data.max_length=256",
                "trainer.max_steps=6",
                "trainer.batch_size=2",
                "trainer.lr=3e-3",
                "guards.enabled=false",
                *FAST,
                "eval.before=true",
            ]
        )
        == 0
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data"]["packed_rows"] < summary["data"]["train_examples"] == 64
    assert summary["after"]["eval_loss"] < summary["before"]["eval_loss"]


def test_packing_an_objective_that_does_not_read_packed_rows_is_a_one_line_error(
    tmp_path, capsys, lft_tiny_model, lft_pref_data
):
    code = main(
        [
            "run",
            "--plugin",
            "dpo",
            "--model",
            str(lft_tiny_model),
            "--data",
            str(lft_pref_data["train"]),
            "--output",
            str(tmp_path / "o"),
            "data.packing=true",
            "guards.enabled=false",
            *FAST,
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "data.packing: the dpo objective does not train on packed rows" in err
    assert len(err.strip().splitlines()) == 1


def test_inspect_shows_the_packed_rows_with_their_boundaries(capsys, lft_tiny_model, lft_sft_data):
    assert (
        main(
            [
                "inspect",
                "--json",
                "--model",
                str(lft_tiny_model),
                "--data",
                str(lft_sft_data["train"]),
                "-n",
                "2",
                "data.packing=true",
                "data.max_length=256",
            ]
        )
        == 0
    )
    shown = json.loads(capsys.readouterr().out)
    assert shown["stats"]["packed_rows"] < shown["stats"]["examples"] == 64
    first = shown["examples"][0]
    assert "+" in first["where"]  # the row holds several examples, named by their lines
    starts = [t for t in first["parts"]["input_ids"] if t["starts_example"]]
    assert len(starts) == first["where"].count("+") and not any(t["trained"] for t in starts)


@pytest.mark.parametrize("segment", [True, False])
def test_training_switches_to_segment_attention_and_back(tmp_path, lft_tiny_model, lft_sft_data, segment):
    import lightning as L

    seen = []

    class Watch(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(pl_module.model.config._attn_implementation)

    class Plugin:
        name, kind = "test-watch-attention", "extension"

        @lft.hookimpl
        def lft_callbacks(self, config):
            return [Watch()]

    overrides = dict(item.split("=", 1) for item in FAST)
    config = {
        "model.path": str(lft_tiny_model),
        "data.train": str(lft_sft_data["train"]),
        "data.packing": True,
        "output": str(tmp_path / "o"),
        "trainer.max_steps": 2,
        "trainer.segment_attention": segment,
        "guards.enabled": False,
        **overrides,
    }
    result = lft.run(config, plugins=[Plugin()], quiet=True)
    assert seen == ["lft_sdpa" if segment else "sdpa"] * 2
    assert result.history and lft.load(str(tmp_path / "o" / "final")).model.config._attn_implementation == "sdpa"

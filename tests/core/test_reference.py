"""The reference policy: adapter switched off, frozen copy, fingerprints, the precomputed cache,
and the training-time checks (start equality, likelihood displacement)."""

import copy
import json
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lft.adapters.lora import apply_lora
from lft.data.format import pad_collate
from lft.losses import DPOLoss, PairLogps, SimPOLoss
from lft.model import reference as refmod
from lft.plugins.dpo import DPOOptions
from lft.plugins.pairs import TOKEN_KEYS, format_pair, pair_logps
from lft.plugins.preference import REFERENCE_KEYS, DisplacementWatch, PreferenceObjective

from pair_rows import ROWS


@pytest.fixture(scope="module")
def parts(lft_tiny_model):
    tokenizer = AutoTokenizer.from_pretrained(lft_tiny_model)
    features = [format_pair(r, tokenizer, DPOOptions(), 512, "dpo") for r in ROWS]
    return tokenizer, features


def load(path):
    return AutoModelForCausalLM.from_pretrained(path)


def logps(model, tokenizer, features):
    with torch.no_grad():
        return pair_logps(model, pad_collate(features, tokenizer.pad_token_id), tokenizer.pad_token_id, 64)[0]


def test_adapter_disabled_reference_equals_the_base_model(lft_tiny_model, parts):
    tokenizer, features = parts
    base = logps(load(lft_tiny_model).eval(), tokenizer, features)
    policy = apply_lora(load(lft_tiny_model), r=4, alpha=8, dropout=0.0, targets="attention")
    for name, param in policy.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)  # as if trained: the adapter now changes the outputs
    policy.train()
    reference = refmod.ReferencePolicy.of(policy)
    assert reference.kind == "adapter-disabled"
    with reference.model() as ref:
        assert ref is policy and not ref.training and not torch.is_grad_enabled()
        got = logps(ref, tokenizer, features)
    assert torch.allclose(got, base, atol=1e-5)
    assert policy.training  # mode restored
    assert not torch.allclose(logps(policy.eval(), tokenizer, features), base, atol=1e-2)
    assert refmod.weights_fingerprint(policy) == refmod.weights_fingerprint(load(lft_tiny_model))


def test_full_fine_tuning_reference_is_a_frozen_copy(lft_tiny_model, parts):
    tokenizer, features = parts
    policy = load(lft_tiny_model)
    before = logps(policy.eval(), tokenizer, features)
    reference = refmod.ReferencePolicy.of(policy)
    fingerprint = reference.fingerprint()
    with torch.no_grad():
        for param in policy.parameters():
            param.add_(0.05 * torch.randn_like(param))  # a training update
    assert refmod.weights_fingerprint(policy) != fingerprint
    with reference.model() as ref:
        assert ref is not policy and not any(p.requires_grad for p in ref.parameters())
        assert torch.allclose(logps(ref, tokenizer, features), before, atol=1e-6)
    assert reference.fingerprint() == fingerprint
    reference.release()
    with pytest.raises(Exception, match="released"):
        with reference.model():
            pass


def test_precompute_reads_its_cache_and_a_tokenizer_change_makes_a_new_key(tmp_path, lft_tiny_model, parts):
    tokenizer, features = parts
    model = apply_lora(load(lft_tiny_model), r=4, alpha=8, dropout=0.0, targets="attention")
    reference = refmod.ReferencePolicy.of(model)
    objective = PreferenceObjective(DPOLoss())
    cache = refmod.ReferenceCache(tmp_path)
    pad = tokenizer.pad_token_id

    def key_for(tok):
        return refmod.cache_key(
            reference.fingerprint(),
            refmod.tokenizer_fingerprint(tok),
            "32-true",
            refmod.data_fingerprint(features, TOKEN_KEYS),
        )

    def run(tok, feats):
        return refmod.precompute(
            reference,
            feats,
            lambda m, b: objective.reference_logps(m, b, pad),
            lambda fs: pad_collate(fs, pad),
            REFERENCE_KEYS,
            1,
            key=key_for(tok),
            cache=cache,
        )

    first = copy.deepcopy(features)
    assert run(tokenizer, first) == "computed"
    again = copy.deepcopy(features)
    assert run(tokenizer, again) == "cache"
    assert [f["ref_chosen_logps"] for f in again] == [f["ref_chosen_logps"] for f in first]
    expected = logps(load(lft_tiny_model).eval(), tokenizer, features)
    assert [f["ref_chosen_logps"] for f in first] == pytest.approx(expected[:2].tolist(), abs=1e-4)

    changed = copy.deepcopy(tokenizer)
    changed.add_special_tokens({"additional_special_tokens": ["<|tool|>"]})  # same token ids for this data
    assert key_for(changed) != key_for(tokenizer)
    assert run(changed, copy.deepcopy(features)) == "computed"  # the stale entry is not used
    templated = copy.deepcopy(tokenizer)
    templated.chat_template = tokenizer.chat_template.replace("tiny test model", "tiny model")
    assert key_for(templated) != key_for(tokenizer)


def test_a_damaged_cache_entry_is_recomputed(tmp_path):
    cache = refmod.ReferenceCache(tmp_path)
    cache.save("k", {"a": torch.zeros(3)}, {})
    assert cache.load("k", ["a"], 3) is not None
    assert cache.load("k", ["a"], 4) is None  # wrong number of examples
    cache.path("k").write_bytes(b"garbage")
    assert cache.load("k", ["a"], 3) is None


def fake_module(step=0):
    return SimpleNamespace(global_step=step)


def pairs(chosen, rejected, ref_chosen=None, ref_rejected=None, tokens=10):
    t = lambda v: None if v is None else torch.tensor([v])  # noqa: E731
    return PairLogps(t(chosen), t(rejected), t(tokens), t(tokens), t(ref_chosen), t(ref_rejected))


def observe(objective, step, logps):
    objective.observe(fake_module(step), logps, objective.loss(logps))


def test_start_check_warns_when_policy_and_reference_differ():
    objective = PreferenceObjective(DPOLoss())
    observe(objective, 0, pairs(-10.0, -12.0, -10.0, -12.0))
    assert objective.warnings == [] and objective.notes["reference_start_gap"] == 0.0
    objective = PreferenceObjective(DPOLoss())
    observe(objective, 0, pairs(-10.0, -12.0, -15.0, -12.0))  # log-ratios 5/10 and 0/10 per token: mean 0.25
    assert len(objective.warnings) == 1 and "differ before training" in objective.warnings[0]
    assert objective.notes["reference_start_gap"] == pytest.approx(0.25)


def test_likelihood_displacement_against_the_reference_is_reported_once():
    """Window 3. Steps 1-3: chosen log-ratio +0.1 per token (margin 0.1 * (1 + 2) = 0.3). From step 4:
    chosen -0.3 per token, rejected -0.9 (margin 0.6). At step 5 the last three steps average
    (0.1 - 0.3 - 0.3) / 3 = -0.17 per token, below -0.1, and their margin (0.3 + 0.6 + 0.6) / 3 = 0.5
    exceeds the first three steps' (0 + 0.3 + 0.3) / 3 = 0.2: displacement, reported once."""
    objective = PreferenceObjective(DPOLoss(beta=0.1))
    objective.watch = DisplacementWatch(window=3, tolerance=0.1)
    observe(objective, 0, pairs(-10.0, -12.0, -10.0, -12.0))  # starts equal: reward margin 0
    for step in range(1, 4):  # chosen 0.1 nats per token up, rejected down: not displacement
        observe(objective, step, pairs(-9.0, -14.0, -10.0, -12.0))
    assert objective.warnings == []
    for step in range(4, 10):  # chosen 3 nats (0.3 per token) below the reference, rejected 9 below
        observe(objective, step, pairs(-13.0, -21.0, -10.0, -12.0))
    assert len(objective.warnings) == 1
    assert objective.warnings[0].startswith(
        "likelihood displacement at step 5: the chosen completions are 0.17 "
        "nats per token less likely than under the reference while the reward "
        "margin grew by 0.30"
    )


def test_likelihood_displacement_without_a_reference_uses_the_first_steps():
    """SimPO (beta 2), window 2. Steps 0-1: chosen -1.0 per token, rejected -1.2: margin 0.4. Steps 2-3:
    chosen -1.5, rejected -2.5: margin 2.0. At step 2 the last two steps average -1.25 per token, 0.25
    below the first two steps' -1.0, and their margin (0.4 + 2.0) / 2 = 1.2 grew by 0.8."""
    objective = PreferenceObjective(SimPOLoss())
    objective.watch = DisplacementWatch(window=2, tolerance=0.1)
    for step in range(2):
        observe(objective, step, pairs(-10.0, -12.0))
    for step in range(2, 4):
        observe(objective, step, pairs(-15.0, -25.0))
    assert len(objective.warnings) == 1 and "than at the start of training" in objective.warnings[0]
    assert objective.warnings[0].startswith(
        "likelihood displacement at step 2: the chosen completions are 0.25 "
        "nats per token less likely than at the start of training while the "
        "reward margin grew by 0.80"
    )


def test_precomputed_and_live_references_train_the_same(tmp_path, monkeypatch, lft_tiny_model, lft_pref_data):
    from test_run import fast_config

    import lft

    monkeypatch.setenv("LFT_CACHE", str(tmp_path / "cache"))
    extra = {"plugins": ["dpo", "full"], "trainer.max_steps": 3, "trainer.lr": 1e-3, "eval.before": True}
    live = lft.run(fast_config(lft_tiny_model, lft_pref_data, tmp_path / "live", **extra), quiet=True)
    pre = lft.run(
        fast_config(lft_tiny_model, lft_pref_data, tmp_path / "pre", **extra, **{"dpo.precompute_reference": True}),
        quiet=True,
    )
    assert [h["loss"] for h in pre.history] == pytest.approx([h["loss"] for h in live.history], rel=1e-4)
    assert pre.metrics["after"]["eval_loss"] == pytest.approx(live.metrics["after"]["eval_loss"], rel=1e-4)
    assert pre.metrics["notes"]["reference_train"].startswith("64 pairs computed")
    again = lft.run(
        fast_config(lft_tiny_model, lft_pref_data, tmp_path / "again", **extra, **{"dpo.precompute_reference": True}),
        quiet=True,
    )
    assert again.metrics["notes"]["reference_train"].startswith("64 pairs read from cache")
    assert again.metrics["notes"]["reference_eval"].startswith("16 pairs read from cache")
    assert not [w for w in again.metrics.get("warnings", []) if "reference" in w], again.metrics["warnings"]
    summary = json.loads((tmp_path / "again" / "summary.json").read_text())
    assert summary["notes"]["reference_start_gap"] < 1e-4

"""Numerical faults: a NaN/Inf loss or gradient stops the run before the weights change, or
skips the optimizer step without touching the weights or the optimizer state."""

import json
import math
import random

import pytest
import torch

import lft
from lft.plugin.testing import FAST
from lft.plugins.sft import SFT
from lft.train.numerics import MAX_CONSECUTIVE_SKIPS


class FaultySFT(SFT):
    """SFT whose loss (``where="loss"``) or gradient (``where="grad"``) is NaN at some steps."""

    def __init__(self, steps, where="loss"):
        self.steps, self.where = set(steps), where

    def objective(self, config):
        inner, steps, where = super().objective(config), self.steps, self.where

        def faulty(module, batch):
            loss, metrics = inner(module, batch)
            if module.global_step + 1 in steps or "all" in steps:
                if where == "loss":
                    loss = loss * float("nan")
                else:  # finite value, NaN gradient: d/dx sqrt(|x|) at 0 is inf, times 0
                    param = next(p for p in module.parameters() if p.requires_grad)
                    loss = loss + (param.sum() * 0).abs().sqrt()
            return loss, metrics

        return faulty


class Watch:
    """Keeps copies of the trained weights and the optimizer state after every optimizer step."""

    name = "watch"

    def __init__(self):
        self.after = {}

    @lft.hookimpl
    def lft_callbacks(self, config):
        import lightning as L

        plugin = self

        class Snapshot(L.Callback):
            def on_train_start(self, trainer, pl_module):
                plugin.after[trainer.global_step] = plugin.snapshot(trainer, pl_module)

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                plugin.after[trainer.global_step] = plugin.snapshot(trainer, pl_module)

        return [Snapshot()]

    @staticmethod
    def snapshot(trainer, module):
        weights = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
        optimizer = trainer.optimizers[0].state_dict()["state"]
        state = {k: {n: (v.clone() if torch.is_tensor(v) else v) for n, v in s.items()} for k, s in optimizer.items()}
        return weights, state


def config(model, data, output, **extra):
    out = {
        "model.path": str(model),
        "data.train": str(data["train"]),
        "data.eval": str(data["eval"]),
        "output": str(output),
        "plugins": ["lora"],
        "trainer.lr": 5e-3,
        "trainer.batch_size": 4,
    }
    for item in FAST:
        key, value = item.split("=")
        out[key] = {"true": True, "false": False, "none": None}.get(value, value)
    out.update(extra)
    return out


def metrics(output):
    """The training-step records (the guards' evaluation records carry eval_loss instead)."""
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "loss" in r]


def batch_rows(data_file, seed, batch, size):
    """The file:line of the rows in ``batch`` of epoch 0, worked out from the loader's seeded order."""
    lines = [f"{data_file}:{i + 1}" for i, _ in enumerate(data_file.read_text().splitlines())]
    order = list(range(len(lines)))
    random.Random(seed * 1000003 + 0).shuffle(order)
    return [lines[i] for i in order[batch * size : (batch + 1) * size]]


def test_nan_loss_stops_before_the_update_and_names_step_and_rows(tmp_path, lft_tiny_model, lft_sft_data):
    out = tmp_path / "out"
    cfg = config(lft_tiny_model, lft_sft_data, out, **{"trainer.max_steps": 8, "trainer.checkpoint_every": 2})
    with pytest.raises(lft.LftError) as info:
        lft.run(cfg, plugins=[FaultySFT({5})], quiet=True)
    message = str(info.value)
    rows = batch_rows(lft_sft_data["train"], 42, batch=4, size=4)
    assert message.startswith(
        f"non-finite loss (nan) in epoch 0 batch 4 (rows {', '.join(rows)}) at step 5; "
        "stopped before updating the weights."
    )
    assert f"The last good checkpoint, {out / 'checkpoints' / 'last.ckpt'}, is kept" in message
    assert "trainer.on_nonfinite=skip" in message and "\n" not in message
    from lft.train import checkpoint

    kept = checkpoint.load(out / "checkpoints" / "last.ckpt")
    assert kept["global_step"] == 4
    assert all(torch.isfinite(t).all() for t in kept["state_dict"].values())
    assert [m["step"] for m in metrics(out)] == [1, 2, 3, 4]
    assert not (out / "final").exists()


def test_nan_gradient_stops_too(tmp_path, lft_tiny_model, lft_sft_data):
    cfg = config(lft_tiny_model, lft_sft_data, tmp_path / "out", **{"trainer.max_steps": 4})
    with pytest.raises(
        lft.LftError,
        match=r"non-finite gradient of model\.\S+ in epoch 0 batch 2 \(rows .*\) at step 3;"
        r".*No checkpoint had been saved yet",
    ):
        lft.run(cfg, plugins=[FaultySFT({3}, where="grad")], quiet=True)


@pytest.mark.parametrize("where", ["loss", "grad"])
def test_skip_leaves_weights_and_optimizer_state_untouched(tmp_path, lft_tiny_model, lft_sft_data, where):
    out = tmp_path / "out"
    watch = Watch()
    cfg = config(lft_tiny_model, lft_sft_data, out, **{"trainer.max_steps": 12, "trainer.on_nonfinite": "skip"})
    result = lft.run(cfg, plugins=[FaultySFT({4}, where=where), watch], quiet=True)
    before_w, before_opt = watch.after[3]
    after_w, after_opt = watch.after[4]
    for name in before_w:  # the skipped step changed nothing
        assert torch.equal(before_w[name], after_w[name])
    assert before_opt.keys() == after_opt.keys()
    for key in before_opt:
        for field, value in before_opt[key].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(after_opt[key][field])), (key, field)
    final_w, final_opt = watch.after[12]
    assert all(torch.isfinite(w).all() for w in final_w.values())
    assert all(float(s["step"]) == 11 for s in final_opt.values())  # 12 steps, one skipped
    assert not torch.equal(final_w[next(iter(final_w))], after_w[next(iter(final_w))])  # training went on
    records = {m["step"]: m for m in metrics(out)}
    assert records[4]["nonfinite_skipped"] == 1.0 and "nonfinite_skipped" not in records[5]
    assert (records[4]["loss"] is None) == (where == "loss")  # NaN is written as null
    losses = [records[s]["loss"] for s in range(1, 13) if s != 4]
    assert sum(losses[-3:]) < sum(losses[:3])
    assert math.isfinite(result.metrics["after"]["eval_loss"])


def test_skipping_forever_stops(tmp_path, monkeypatch, lft_tiny_model, lft_sft_data):
    assert MAX_CONSECUTIVE_SKIPS == 20
    monkeypatch.setattr("lft.train.numerics.MAX_CONSECUTIVE_SKIPS", 3)  # the same rule, sooner
    cfg = config(
        lft_tiny_model, lft_sft_data, tmp_path / "out", **{"trainer.max_steps": 8, "trainer.on_nonfinite": "skip"}
    )
    with pytest.raises(
        lft.LftError,
        match=r"3 optimizer steps in a row had a non-finite loss or gradient \(the last at "
        r"step 3\); stopped",
    ):
        lft.run(cfg, plugins=[FaultySFT({"all"})], quiet=True)


def test_a_huge_learning_rate_is_a_clean_error_not_a_crash(tmp_path, capsys, lft_tiny_model, lft_sft_data):
    from lft.cli.main import main

    argv = [
        "run",
        "-q",
        "--model",
        str(lft_tiny_model),
        "--data",
        str(lft_sft_data["train"]),
        "--output",
        str(tmp_path / "o"),
        "--plugin",
        "full",
        *FAST,
        "trainer.max_steps=30",
        "trainer.lr=1e30",
        "trainer.max_grad_norm=null",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: non-finite ") and err.count("\n") == 1

"""``trainer.compile`` compiles each transformer layer for training and leaves the maths alone.
The test uses torch.compile's aot_eager backend (no C compiler needed); the benchmark measures
inductor."""

import pytest

import lft
from lft.plugin.testing import FAST


@pytest.mark.slow
def test_compiled_layers_train_like_plain_ones(tmp_path, lft_tiny_model, lft_sft_data):
    base = {
        "model.path": str(lft_tiny_model),
        "data.train": str(lft_sft_data["train"]),
        "plugins": ["lora"],
        **dict(item.split("=", 1) for item in FAST),
        "trainer.max_steps": 3,
        "trainer.lr": 1e-2,
        "overwrite": True,
    }
    from torch._dynamo.utils import counters

    plain = lft.run({**base, "output": str(tmp_path / "plain")}, quiet=True)
    counters.clear()
    compiled = lft.run(
        {**base, "output": str(tmp_path / "compiled"), "trainer.compile": True, "trainer.compile_backend": "aot_eager"},
        quiet=True,
    )
    assert counters["stats"]["unique_graphs"] >= 1  # the layers really were compiled
    assert [h["loss"] for h in compiled.history] == pytest.approx([h["loss"] for h in plain.history], rel=1e-4)
    assert compiled.metrics["after"]["eval_loss"] == pytest.approx(plain.metrics["after"]["eval_loss"], rel=1e-4)

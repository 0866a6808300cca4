"""data.streaming: the training rows read lazily as training takes them; the held-out rows left
out of every pass; resume at the right row; a bad row still named by file and line."""

import json

import pytest

import lft
from lft.config import DataSource
from lft.data.stream import held_out, stream_rows
from lft.plugin.testing import FAST


def config(model, train, output, **extra):
    out = {
        "model.path": str(model),
        "data.train": str(train),
        "output": str(output),
        "plugins": ["lora"],
        "trainer.max_steps": 8,
        "trainer.lr": 5e-3,
        "trainer.schedule": "constant",  # the same learning rates however long the first attempt is
        "trainer.warmup_steps": 0,
        "trainer.batch_size": 2,
        "data.streaming": True,
        "guards.enabled": False,
    }
    return {**dict(item.split("=", 1) for item in FAST), **out, **extra}


def test_the_held_out_rows_are_left_out_of_every_pass(lft_sft_data):
    mixture = [DataSource(path=str(lft_sft_data["train"]))]
    rows = len(lft_sft_data["train"].read_text().splitlines())
    held, heads = held_out(mixture, "train", 4)
    assert heads == [4] and [w.rsplit(":", 1)[1] for w in held.where] == ["1", "2", "3", "4"]
    seen = [where for _, (_, where) in zip(range(3 * rows), stream_rows(mixture, "train", 0, heads))]
    assert len(seen) == 3 * rows  # three passes and more: the stream starts again at its end
    assert not set(seen) & set(held.where)
    assert seen[: rows - 4] == seen[rows - 4 : 2 * (rows - 4)]  # a source's pass is in file order


def test_a_streamed_run_resumes_at_the_row_after_the_last_one_trained(tmp_path, lft_tiny_model, lft_sft_data):
    whole = lft.run(config(lft_tiny_model, lft_sft_data["train"], tmp_path / "whole"), quiet=True)
    assert whole.metrics["data"]["streaming"] is True and len(whole.history) == 8
    first = config(lft_tiny_model, lft_sft_data["train"], tmp_path / "cut", **{"trainer.max_steps": 4})
    lft.run(first, quiet=True)
    resumed = lft.run(config(lft_tiny_model, lft_sft_data["train"], tmp_path / "cut", resume=True), quiet=True)
    assert [h["step"] for h in resumed.history] == [5, 6, 7, 8]
    want = [h["loss"] for h in whole.history[4:]]
    assert [h["loss"] for h in resumed.history] == pytest.approx(want, rel=1e-5)


def test_a_bad_row_deep_in_the_stream_is_named_by_file_and_line(tmp_path, capsys, lft_tiny_model, lft_sft_data):
    from lft.cli.main import main

    lines = lft_sft_data["train"].read_text().splitlines()[:30]
    lines[24] = '{"messages": [oops'
    train = tmp_path / "train.jsonl"
    train.write_text("\n".join(lines) + "\n")
    argv = ["run", "-q", "--model", str(lft_tiny_model), "--data", str(train), "--output", str(tmp_path / "o"),
            "data.streaming=true", "data.streaming_sample=8", "data.max_eval_rows=4", "trainer.max_steps=20",
            "trainer.batch_size=2", "guards.enabled=false", *FAST]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{train}:25: invalid JSON" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"trainer.max_steps": -1}, "needs trainer.max_steps"),
        ({"data.packing": True}, "cannot pack"),
        ({"guards.enabled": True, "guards.contamination.drop": True}, "cannot apply guards.contamination.drop"),
    ],
)
def test_what_streaming_needs_is_a_config_error(tmp_path, lft_tiny_model, lft_sft_data, extra, message):
    with pytest.raises(lft.ConfigError, match=message):
        lft.run(config(lft_tiny_model, lft_sft_data["train"], tmp_path / "o", **extra), quiet=True)


def test_the_summary_says_the_guards_sampled_the_stream(tmp_path, lft_tiny_model, lft_sft_data):
    result = lft.run(
        config(
            lft_tiny_model,
            lft_sft_data["train"],
            tmp_path / "o",
            **{"data.streaming_sample": 10, "trainer.max_steps": 2},
        ),
        quiet=True,
    )
    data = result.metrics["data"]
    assert data["sampled_rows"] == 10 and data["eval_examples"] == 16
    assert json.loads((tmp_path / "o" / "summary.json").read_text())["data"]["streaming"] is True
